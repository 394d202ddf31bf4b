"""Helpers of the engine tests: composed configs for the tiny detector and for small real DETR / LW-DETR models, their
data sets, state-dict comparison."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

from detkit.config import compose

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent

DETECTORS = ("tiny", "detr", "lwdetr")  # the engine's reliability tests run on each

# The shipped model configs, shrunk to train a step in well under a second on one CPU core while keeping what the
# engine has to handle: DETR's ResNet (18, up to layer2: stride 8) with frozen BatchNorm and a frozen stem + layer1,
# transformer dropout, auxiliary losses; LW-DETR's windowed ViT with layer-wise lr groups and drop path, two query
# groups (group DETR), the two-stage encoder outputs and the IA-BCE loss.
REAL_MODELS: dict[str, tuple[str, list[str]]] = {
    "detr": ("detr_r50.yaml", [
        "model.backbone.depth=18", "model.backbone.return_layers=[layer2]", "model.hidden_dim=32",
        "model.num_queries=8", "model.transformer.nhead=2", "model.transformer.num_encoder_layers=1",
        "model.transformer.num_decoder_layers=2", "model.transformer.dim_feedforward=64"]),
    "lwdetr": ("lwdetr_tiny.yaml", [
        "model.hidden_dim=32", "model.num_queries=8", "model.group_detr=2", "model.backbone.embed_dim=32",
        "model.backbone.num_heads=2", "model.backbone.depth=2", "model.backbone.window_blocks=[0]",
        "model.backbone.out_indices=[1]", "model.backbone.drop_path=0.1", "model.transformer.num_layers=2",
        "model.transformer.sa_heads=2", "model.transformer.ca_heads=2", "model.transformer.dim_feedforward=64",
        "model.postprocessor.num_select=8"]),
}
# overrides that switch off every random stream of the model (dropout, drop path): 2 ranks then compute exactly what
# one process computes on the global batch
NO_DROPOUT = {"tiny": ["model.dropout=0.0"], "detr": ["model.transformer.dropout=0.0"],
              "lwdetr": ["model.transformer.dropout=0.0", "model.backbone.drop_path=0.0"]}
# the class head's weight, by state-dict name
CLASS_HEAD = {"tiny": "class_embed.weight", "detr": "head.class_embed.weight", "lwdetr": "class_embed.weight"}
IMAGE_SIZE = {"tiny": 32, "detr": 64, "lwdetr": 64}  # LW-DETR's ViT needs >= num_queries patches of 16 px


def shapes(detector: str, n: int, **kwargs: Any):
    """``TinyShapes`` at the image size ``detector`` takes."""
    from support.tiny_detector import TinyShapes

    return TinyShapes(n, size=IMAGE_SIZE[detector], **kwargs)


def detector_config(detector: str, tmp_path: Path, overrides: list[str] = (), name: str = "run", **train: Any):
    """:func:`tiny_config` for ``detector="tiny"``; otherwise the same run settings with the small real model of
    :data:`REAL_MODELS` (its shipped base config plus the shrinking overrides, then ``overrides``)."""
    if detector == "tiny":
        return tiny_config(tmp_path, overrides, name, **train)
    base, shrink = REAL_MODELS[detector]
    return tiny_config(tmp_path, [*shrink, "plugins.imports=[]", *overrides], name,
                       defaults=[str(REPO / "configs" / "_base_" / "models" / base)], model={"num_classes": None},
                       **{"lr_encoder": 1e-3, **train})


def tiny_config(tmp_path: Path, overrides: list[str] = (), name: str = "run", defaults: list[str] | None = None,
                model: dict[str, Any] | None = None, **train: Any):
    """A composed config that trains the ``tiny_test`` detector (from ``support.tiny_detector``) on CPU; with
    ``defaults`` (config files to start from) and ``model`` (the model section) another model."""
    body = {
        **({"defaults": defaults} if defaults else {}),
        "model": model if model is not None else {"type": "tiny_test"},
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "lr_backbone": 1e-3, "seed": 7,
                  "deterministic": True, "checkpoint_minutes": 0, **train},
        "data": {"num_workers": 0},
        "runtime": {"output_dir": str(tmp_path / name), "device": "cpu", "progress": "log", "threads": 1,
                    "tensorboard": False, "plot": False},
        "plugins": {"imports": ["support.tiny_detector"]},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.{os.getpid()}.yaml"  # one file per process: ranks of a DDP test share tmp_path
    path.write_text(yaml.safe_dump(body))
    return compose(path, list(overrides))


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), f"{k} differs (max {float((a[k].float() - b[k].float()).abs().max())})"
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
