"""Checkpoint formats are entries of ``CHECKPOINT_FORMATS``: ``model.init_from``, ``detkit convert``'s detection and
``load_for_inference`` find a plugin's format as they find the built-in ones (the layering: test_import_graph.py)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from detkit.config import compose, to_container
from detkit.errors import CheckpointError
from detkit.loading import load_for_inference
from detkit.models.build import BACKBONE_LOADER_KEYS, LOADER_KEYS, build_model, recipe_node
from detkit.registry import CHECKPOINT_FORMATS
from detkit.weights import apply
from detkit.weights.formats import CheckpointFormat, detect_official
from detkit.weights.formats import detr as detr_format
from detkit.weights.io import save_checkpoint
from detkit.weights.keys import BACKBONE_LOADER_KEYS as WEIGHTS_BACKBONE_KEYS
from detkit.weights.keys import MODEL_LOADER_KEYS, split_loader_keys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support.engine import REAL_MODELS  # noqa: E402
from support.tiny_detector import TinyDetector  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL_DETR = [*REAL_MODELS["detr"][1], "model.num_classes=3", "model.backbone.weights=null"]


def test_official_detr_file_loads_for_inference_with_the_config_of_its_variant(tmp_path):
    torch.manual_seed(0)
    model_cfg = to_container(compose(REPO / "configs" / "detr_r50.yaml", SMALL_DETR).model)
    trained = build_model(model_cfg).eval()
    save_checkpoint({"model": detr_format.detkit_to_official(trained.state_dict())}, tmp_path / "official.pth")
    loaded = load_for_inference(tmp_path / "official.pth", config=REPO / "configs" / "detr_r50.yaml",
                                overrides=SMALL_DETR, device="cpu", optimize=False)
    own = loaded.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in trained.state_dict().items())
    assert loaded.weights == "model" and loaded.classes == ["class_0", "class_1", "class_2"]
    # without a config the file cannot be rebuilt; the error names its format
    with pytest.raises(CheckpointError, match="is an official DETR checkpoint, which records no config"):
        load_for_inference(tmp_path / "official.pth", device="cpu")


class _TinyOfficial(CheckpointFormat):
    """The tiny test detector's 'official' layout: every key under ``net.``."""

    label = "official tiny"
    extra_class_rows = 1

    def looks_official(self, state: Mapping[str, Any]) -> bool:
        return "net.class_embed.weight" in state

    def looks_detkit(self, state: Mapping[str, Any]) -> bool:
        return "class_embed.weight" in state and "query_embed.weight" in state

    def to_detkit(self, state: Mapping[str, Any], model_cfg: Any = None, inference_only: Any = None
                  ) -> dict[str, Tensor]:
        return {k.removeprefix("net."): v for k, v in state.items()}

    def to_official(self, state: Mapping[str, Any], model_cfg: Any = None, inference_only: Any = None
                    ) -> dict[str, Tensor]:
        return {f"net.{k}": v for k, v in state.items()}


@pytest.fixture
def tiny_format():
    CHECKPOINT_FORMATS.register("tiny_test")(_TinyOfficial)
    try:
        yield
    finally:
        CHECKPOINT_FORMATS._entries.pop("tiny_test", None)


def test_a_registered_format_is_detected_and_converted_by_init_from(tmp_path, tiny_format):
    torch.manual_seed(0)
    source = TinyDetector(num_classes=3)
    official = _TinyOfficial().to_official(source.state_dict())
    assert detect_official(official, "x.pth") == "tiny_test"
    torch.save({"model": official}, tmp_path / "tiny_official.pth")
    target = TinyDetector(num_classes=3)
    report = apply.init_from(target, str(tmp_path / "tiny_official.pth"), model_type="tiny_test")
    assert report.format == "official tiny" and report.renamed.startswith("official -> detkit names")
    assert sorted(report.converted) == sorted(source.state_dict()) and not report.reinitialised
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())
    # its type is checked like a built-in one: an LW-DETR config does not take a tiny checkpoint
    with pytest.raises(CheckpointError, match="holds a 'tiny_test' model, but this config builds 'lwdetr'"):
        apply.init_from(TinyDetector(num_classes=3), str(tmp_path / "tiny_official.pth"), model_type="lwdetr")


def test_the_model_build_and_the_loader_agree_on_the_loader_keys():
    assert set(LOADER_KEYS) == set(MODEL_LOADER_KEYS) and set(BACKBONE_LOADER_KEYS) == set(WEIGHTS_BACKBONE_KEYS)
    cfg = to_container(compose(REPO / "configs" / "detr_r50.yaml", [
        *SMALL_DETR, "model.init_from=https://example.org/detr-r50-e632da11.pth", "model.class_map=o365_to_coco",
        "model.init_from_ema=true", "model.backbone.weights=IMAGENET1K_V1"]).model)
    assert recipe_node(cfg) == split_loader_keys(cfg)[0]
