"""Every official model exports: an official-format checkpoint (random weights, perturbed away from the zero-init
heads as trained weights are; shapes from ``shared/reference/state_dicts``) converted with ``detkit convert``,
exported with ``detkit export`` and checked by it at two batch sizes and two resolutions in one file.

The inputs are small (the check's cost grows with them, its coverage does not): DETR at 64x64, LW-DETR at the
smallest multiple of 64 whose feature maps hold ``num_queries`` positions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detkit.cli import main
from detkit.convert.cli import main as convert_main
from detkit.export.onnx import read_metadata
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
def test_official_checkpoint_converts_and_exports(name, official_files, tmp_path, capsys):
    config, reference, side = MODELS[name]
    ckpt = tmp_path / f"{name}.pth"
    assert convert_main([str(official_files(reference)), "--config", str(CONFIGS / config), "--out", str(ckpt)]) == 0
    out = tmp_path / f"{name}.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--height", str(side),
                 "--width", str(side)]) == 0
    printed = capsys.readouterr().out
    step = 64 if name.startswith("lwdetr") else 32
    for batch in (1, 2):
        for size in (f"{side}x{side}", f"{side + step}x{side + 2 * step}"):
            assert f"batch {batch}  {size}:" in printed, printed
    assert "check passed" in printed, printed
    meta = read_metadata(out)
    assert meta["dynamic"] == "all" and len(json.loads(meta["classes"])) == 91
