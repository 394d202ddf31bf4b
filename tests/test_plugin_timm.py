"""The detkit-timm plugin distribution, installed with pip as a user would, shows up and builds a working model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

PLUGIN = REPO / "plugins" / "detkit-timm"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """pip-install plugins/detkit-timm into a private target folder; return the environment that sees it."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
           "--target", str(target), str(PLUGIN)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=build, timeout=300)
    assert out.returncode == 0, out.stderr
    assert any(p.name.startswith("detkit_timm-0.1.0") for p in target.iterdir())
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(REPO)])}


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "detkit.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


def test_list_shows_distribution_and_version(installed):
    out = run(["list", "backbone"], installed)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.split()[0] == "timm")
    assert "detkit-timm 0.1.0 (detkit_timm)" in line


def test_plugin_config_checks(installed):
    for config in sorted((PLUGIN / "configs").glob("*.yaml")):
        out = run(["check", str(config), "--quiet"], installed)
        assert out.returncode == 0, out.stderr
        assert "TimmBackbone" in out.stdout


def test_model_with_plugin_backbone_runs_forward(installed):
    code = r"""
import torch
from detkit import compose, build_model
from pathlib import Path
cfgs = sorted(Path('plugins/detkit-timm/configs').glob('*.yaml'))
cfg = compose(cfgs[0], ['model.num_classes=3'])
torch.manual_seed(0)
model = build_model(cfg.model).eval()
assert type(model.backbone).__name__ == 'TimmBackbone'
images = torch.randn(2, 3, 128, 128)
mask = torch.zeros(2, 128, 128, dtype=torch.bool)
mask[1, :, 96:] = True
with torch.no_grad():
    out = model(images, mask)
import json
print(json.dumps([list(out['pred_logits'].shape), list(out['pred_boxes'].shape), bool(torch.isfinite(out['pred_boxes']).all())]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=installed, cwd=REPO,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    shape_logits, shape_boxes, finite = json.loads(out.stdout.strip().splitlines()[-1])
    assert shape_logits == [2, 100, 4] and shape_boxes == [2, 100, 4] and finite  # 3 classes + no-object
