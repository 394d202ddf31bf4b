"""Every official model exports: an official-format checkpoint (random weights, perturbed away from the zero-init
heads as trained weights are; shapes from ``shared/reference/state_dicts``) converted with ``detkit convert``,
exported with a dynamic batch and image size, and checked against PyTorch at two batch sizes (the second
resolution of one file is checked in ``test_export.py``; ``detkit export`` itself checks both).

The inputs are small (the check's cost grows with them, its coverage does not): DETR at 64x64, LW-DETR at the
smallest multiple of 64 whose feature maps hold ``num_queries`` positions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detkit.convert.cli import main as convert_main
from detkit.export.onnx import export_onnx, verify_onnx
from detkit.loading import load_for_inference
from tests.conftest import CONFIGS
from tests.test_convert_detr import synthetic_official as detr_official
from tests.test_convert_lwdetr import synthetic_official as lwdetr_official

#: model -> (config, reference state dict (the DC5 variants share their backbone's), export side)
MODELS = {
    "detr_r50": ("detr_r50.yaml", "detr_r50", 64),
    "detr_r50_dc5": ("detr_r50_dc5.yaml", "detr_r50", 64),
    "detr_r101": ("detr_r101.yaml", "detr_r101", 64),
    "detr_r101_dc5": ("detr_r101_dc5.yaml", "detr_r101", 64),
    "lwdetr_tiny": ("lwdetr_tiny_coco.yaml", "lwdetr_tiny", 192),  # P4, 100 queries: 12x12 positions
    "lwdetr_small": ("lwdetr_small_coco.yaml", "lwdetr_small", 320),  # P4, 300 queries: 20x20
    "lwdetr_medium": ("lwdetr_medium_coco.yaml", "lwdetr_medium", 320),
    "lwdetr_large": ("lwdetr_large_coco.yaml", "lwdetr_large", 192),  # P3 + P5: 24x24 + 6x6
    "lwdetr_xlarge": ("lwdetr_xlarge_coco.yaml", "lwdetr_xlarge", 192),
}


@pytest.fixture(scope="module")
def official_files(tmp_path_factory, shared):
    """``reference name -> official checkpoint file``, written once per module (the DC5 variants reuse theirs)."""
    folder = tmp_path_factory.mktemp("official")
    files: dict[str, Path] = {}

    def get(reference: str) -> Path:
        if reference not in files:
            state = lwdetr_official(reference.split("_")[1]) if reference.startswith("lwdetr") else \
                detr_official(shared, reference)
            files[reference] = folder / f"{reference}.pth"
            torch.save({"model": state}, files[reference])
        return files[reference]

    yield get
    for path in files.values():
        path.unlink(missing_ok=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_official_checkpoint_converts_and_exports(name, official_files, tmp_path):
    config, reference, side = MODELS[name]
    ckpt = tmp_path / f"{name}.pth"
    assert convert_main([str(official_files(reference)), "--config", str(CONFIGS / config), "--out", str(ckpt)]) == 0
    model = load_for_inference(ckpt).model
    out = export_onnx(model, tmp_path / f"{name}.onnx", side, side)
    records = verify_onnx(out, model, [(1, side, side), (2, side, side)])
    assert [r["failure"] for r in records] == [None, None]
