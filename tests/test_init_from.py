"""``model.init_from``: whole detectors from detkit, official DETR and official LW-DETR (regular / EMA) checkpoints,
class-head rows matched by class name or ``model.class_map``, and the load report. Synthetic checkpoints are built
from the reference shape files; nothing is downloaded."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from detkit.config import compose, to_container
from detkit.data.classes import COCO_OFFICIAL_CLASSES
from detkit.weights.io import save_checkpoint
from detkit.errors import CheckpointError, ConfigError
from detkit.weights import apply as P
from detkit.weights import class_rows
from detkit.models.build import build_model
from tests.conftest import CONFIGS


def _shapes(shared: Path, variant: str) -> dict[str, list[int]]:
    shapes = json.loads((shared / f"reference/state_dicts/{variant}.json").read_text())
    shapes.pop("__num_params__")
    return shapes


def official_state(shared: Path, variant: str, real: tuple[str, ...] = (), seed: int = 0) -> dict[str, torch.Tensor]:
    """An official-layout state dict: random values for keys containing one of ``real`` (all keys with
    ``real=("",)``), small on-disk zero tensors elsewhere (stride 0)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in _shapes(shared, variant).items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(5)
        elif any(r in key for r in real):
            out[key] = torch.randn(shape, generator=gen) / math.sqrt(max(1, math.prod(shape[1:])))
        elif key.endswith("running_var"):
            out[key] = torch.ones(()).expand(shape)
        else:
            out[key] = torch.zeros(()).expand(shape)
    return out


def lwdetr_cfg(*overrides: str) -> dict:
    return to_container(compose(CONFIGS / "lwdetr_tiny_coco.yaml", list(overrides)).model)


@pytest.fixture(scope="module")
def lw_official(shared, tmp_path_factory):
    """Official LW-DETR tiny files: a regular checkpoint (``model`` + ``ema_model`` + pickled ``args``) and an EMA
    one (``checkpoint_best_ema.pth``: EMA weights under ``model``)."""
    root = tmp_path_factory.mktemp("lw")
    regular = official_state(shared, "lwdetr_tiny", real=("",), seed=1)
    ema = official_state(shared, "lwdetr_tiny", real=("",), seed=2)
    torch.save({"model": regular, "ema_model": ema, "optimizer": {}, "epoch": 59,
                "args": argparse.Namespace(lr=1e-4, encoder="vit_tiny")}, root / "checkpoint.pth")
    torch.save({"model": ema, "epoch": 59, "args": argparse.Namespace(lr=1e-4)}, root / "checkpoint_best_ema.pth")
    return root, regular, ema


def _official_name(key: str) -> str:
    from detkit.weights.formats.lwdetr import _official_name

    return _official_name(key)


def test_official_lwdetr_regular_and_ema_load_exactly(lw_official):
    root, regular, ema = lw_official
    torch.manual_seed(0)
    model = build_model(lwdetr_cfg())
    report = P.init_from(model, str(root / "checkpoint.pth"), classes=list(COCO_OFFICIAL_CLASSES), model_type="lwdetr")
    state = model.state_dict()
    assert all(torch.equal(v, regular[_official_name(k)]) for k, v in state.items())
    assert report.format == "official LW-DETR" and report.entry == "model"
    assert not report.unexpected and not report.reinitialised and not report.class_rows and not report.resized
    assert len(report.converted) == sum(k.startswith("backbone.0.") for k in regular)  # the two renamed prefixes
    assert len(report.loaded) + len(report.converted) == len(state)
    assert report.sha256 == hashlib.sha256((root / "checkpoint.pth").read_bytes()).hexdigest()

    P.init_from(model, str(root / "checkpoint_best_ema.pth"), model_type="lwdetr")
    assert all(torch.equal(v, ema[_official_name(k)]) for k, v in model.state_dict().items())
    report = P.init_from(model, str(root / "checkpoint.pth"), use_ema=True)
    assert report.entry == "ema_model" and "EMA" in report.format
    assert torch.equal(model.state_dict()["class_embed.weight"], ema["class_embed.weight"])


def test_official_lwdetr_into_other_groups_and_classes(lw_official):
    root, regular, _ = lw_official
    torch.manual_seed(0)
    model = build_model(lwdetr_cfg("model.group_detr=2", "model.num_classes=3"))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = P.init_from(model, str(root / "checkpoint.pth"), classes=["dog", "person", "widget"])
    state = model.state_dict()
    q = model.num_queries
    assert torch.equal(state["refpoint_embed.weight"], regular["refpoint_embed.weight"][: 2 * q])
    assert sorted(report.resized) == ["query_feat.weight", "refpoint_embed.weight"]
    assert "transformer.enc_output.5.weight" in report.unexpected  # groups 2..12 have no place in this model
    for key in ("class_embed", "transformer.enc_out_class_embed.1"):
        w, b = state[f"{key}.weight"], state[f"{key}.bias"]
        assert torch.equal(w[0], regular[f"{key}.weight"][18])  # dog = COCO id 18
        assert torch.equal(w[1], regular[f"{key}.weight"][1])  # person = COCO id 1
        assert torch.equal(w[2], fresh[f"{key}.weight"][2])  # a new class keeps the architecture's init
        assert b[2].item() == pytest.approx(-math.log((1 - 0.01) / 0.01))
    assert report.matched_classes == ["dog", "person"] and report.new_classes == ["widget"]
    assert len(report.class_rows) == 2 * 3  # class_embed + 2 two-stage heads, weight and bias
    table = report.table()
    for row in ("loaded", "converted", "resized", "class rows", "re-initialised", "unexpected"):
        assert f"  {row}" in table


def test_inference_only_file_fills_every_training_group(lw_official, tmp_path):
    from detkit.weights.formats.lwdetr import to_inference

    _, regular, _ = lw_official
    torch.save({"model": to_inference(regular, 1)}, tmp_path / "single.pth")
    model = build_model(lwdetr_cfg("model.group_detr=3"))
    report = P.init_from(model, str(tmp_path / "single.pth"))
    state, q = model.state_dict(), model.num_queries
    for g in range(3):
        assert torch.equal(state["query_feat.weight"][g * q:(g + 1) * q], regular["query_feat.weight"][:q])
        assert torch.equal(state[f"transformer.enc_out_bbox_embed.{g}.layers.0.weight"],
                           regular["transformer.enc_out_bbox_embed.0.layers.0.weight"])
    assert not report.reinitialised and not report.unexpected


def test_official_detr_via_url_with_hash_and_class_names(shared, tmp_path, monkeypatch):
    state = official_state(shared, "detr_r50", real=("class_embed", "bbox_embed", "layer4.2.conv3", "query_embed"))
    raw = tmp_path / "detr-r50.pth"
    torch.save({"model": state, "args": argparse.Namespace(backbone="resnet50")}, raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    named = raw.rename(tmp_path / f"detr-r50-{digest[:8]}.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cfg = to_container(compose(CONFIGS / "detr_r50.yaml", ["model.num_classes=3"]).model)
    torch.manual_seed(0)
    model = build_model(cfg)
    fresh = model.state_dict()["head.class_embed.weight"].clone()
    report = P.init_from(model, named.as_uri(), classes=["dog", "person", "widget"], model_type="detr")
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / named.name
    assert report.file == str(cached) and cached.is_file() and report.source == named.as_uri()
    own = model.state_dict()
    w = own["head.class_embed.weight"]
    assert w.shape == (4, 256)
    assert torch.equal(w[0], state["class_embed.weight"][18]) and torch.equal(w[1], state["class_embed.weight"][1])
    assert torch.equal(w[2], fresh[2])  # new class: default Linear init
    assert torch.equal(w[3], state["class_embed.weight"][91])  # no-object row kept
    assert torch.equal(own["backbone.body.layer4.2.conv3.weight"], state["backbone.0.body.layer4.2.conv3.weight"])
    assert torch.equal(own["head.bbox_embed.layers.2.weight"], state["bbox_embed.layers.2.weight"])
    assert report.format == "official DETR" and report.class_rows == ["head.class_embed.weight",
                                                                      "head.class_embed.bias"]
    assert not report.unexpected and not report.reinitialised  # num_batches_tracked is no weight of FrozenBN
    # the cache is used from now on, even without the source
    named.unlink()
    assert P.init_from(model, named.as_uri(), classes=["dog", "person", "widget"]).file == str(cached)
    # an official DETR file into LW-DETR is refused up front
    with pytest.raises(CheckpointError, match="holds a 'detr' model"):
        P.init_from(build_model(lwdetr_cfg("model.group_detr=1", "model.num_queries=10")), str(cached),
                    model_type="lwdetr")


def test_detkit_checkpoint_prefers_ema_and_follows_class_map(tmp_path):
    cfg = lwdetr_cfg("model.group_detr=1", "model.num_queries=10", "model.num_classes=3")
    torch.manual_seed(1)
    src = build_model(cfg)
    weights = {k: v + 0.5 for k, v in src.state_dict().items()}
    ema = {k: v - 0.5 for k, v in src.state_dict().items()}
    save_checkpoint({"model": weights, "ema": {"module": ema, "updates": 9}, "config": {"model": cfg},
                     "classes": ["Person", "car", "dog"], "detkit_version": "0.1.0"}, tmp_path / "run.pth")
    torch.manual_seed(2)
    model = build_model(lwdetr_cfg("model.group_detr=1", "model.num_queries=10", "model.num_classes=4"))
    fresh = model.state_dict()["class_embed.weight"].clone()
    report = P.init_from(model, str(tmp_path / "run.pth"), classes=["dog", "person", "truck", "van"],
                         class_map={"person": "Person", "van": 1}, model_type="lwdetr")
    w = model.state_dict()["class_embed.weight"]
    assert report.entry == "ema" and report.format == "detkit"
    assert torch.equal(w[0], ema["class_embed.weight"][2]) and torch.equal(w[1], ema["class_embed.weight"][0])
    assert torch.equal(w[3], ema["class_embed.weight"][1])  # van <- row 1 (car)
    assert torch.equal(w[2], fresh[2])
    assert report.matched_classes == ["dog", "person <- Person", "van <- 1"] and report.new_classes == ["truck"]
    assert torch.equal(model.state_dict()["backbone.pos_embed"], ema["backbone.pos_embed"])
    # a class map file; and model weights on request
    (tmp_path / "map.yaml").write_text("person: Person\n")
    report = P.init_from(model, str(tmp_path / "run.pth"), classes=["dog", "person", "truck", "van"],
                         class_map=str(tmp_path / "map.yaml"), use_ema=False)
    assert report.entry == "model" and report.new_classes == ["truck", "van"]
    assert torch.equal(model.state_dict()["class_embed.weight"][1], weights["class_embed.weight"][0])
    # mistakes in the map are named
    with pytest.raises(ConfigError, match="'persn'.*did you mean 'person'"):
        P.init_from(model, str(tmp_path / "run.pth"), classes=["dog", "person", "truck", "van"],
                    class_map={"persn": "Person"})
    with pytest.raises(ConfigError, match="not a class of the checkpoint; did you mean 'Person'"):
        P.init_from(model, str(tmp_path / "run.pth"), classes=["dog", "person", "truck", "van"],
                    class_map={"person": "Persn"})
    with pytest.raises(CheckpointError, match="holds a 'lwdetr' model"):
        P.init_from(model, str(tmp_path / "run.pth"), model_type="detr")


def test_objects365_to_coco_map_matches_the_official_remap():
    cmap = class_rows.load_class_map("o365_to_coco")
    assert len(cmap) == 80 and len(set(cmap.values())) == 80 and all(1 <= v <= 365 for v in cmap.values())
    # util/obj365_to_coco_model.py: coco id 1 (person) <- obj 0, 2 (bicycle) <- 46, 90 (toothbrush) <- 226; +1 row
    assert cmap["person"] == 1 and cmap["bicycle"] == 47 and cmap["toothbrush"] == 227 and cmap["tv"] == 38
    state = {"class_embed.weight": torch.arange(366.0)[:, None].expand(366, 4).clone(),
             "class_embed.bias": torch.arange(366.0)}
    head = torch.nn.Linear(4, 91)
    model = torch.nn.Module()
    model.class_embed, model.num_classes = head, 91
    report = P.load_detector_state(model, state, P.WeightsReport(), new_classes=COCO_OFFICIAL_CLASSES,
                                   old_classes=None, class_map="o365_to_coco")
    assert head.bias[1].item() == 1 and head.bias[2].item() == 47 and head.bias[90].item() == 227
    assert len(report.matched_classes) == 80 and report.new_classes == []


def test_unknown_weights_and_missing_files_are_clear(tmp_path):
    model = build_model(lwdetr_cfg("model.group_detr=1", "model.num_queries=10", "model.num_classes=2"))
    with pytest.raises(CheckpointError, match="weights file not found"):
        P.init_from(model, str(tmp_path / "nope.pth"))
    save_checkpoint({"model": {"foo.weight": torch.zeros(3)}}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="no key of"):
        P.init_from(model, str(tmp_path / "x.pth"))
    torch.save({"model": {"a": torch.zeros(1)}, "bad": Path("x")}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="refusing to load"):
        P.init_from(model, str(tmp_path / "pickled.pth"))
    with pytest.raises(CheckpointError, match="no EMA weights"):
        save_checkpoint({"model": model.state_dict(), "classes": ["a", "b"], "config": {}}, tmp_path / "m.pth")
        P.init_from(model, str(tmp_path / "m.pth"), use_ema=True)
