"""Official DETR checkpoints (synthetic, built from the reference shape files) <-> detkit checkpoints."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detkit import build_model, compose
from detkit.weights.formats import detr as conv
from detkit.convert.cli import main
from detkit.data.classes import COCO_OFFICIAL_CLASSES
from detkit.weights.io import load_checkpoint_file
from detkit.weights.state import load_state_dict
from tests.conftest import CONFIGS, REPO


def _shapes(shared: Path, variant: str) -> dict[str, list[int]]:
    shapes = json.loads((shared / f"reference/state_dicts/{variant}.json").read_text())
    shapes.pop("__num_params__")
    return shapes


def synthetic_official(shared: Path, variant: str, seed: int | None = 0) -> dict[str, torch.Tensor]:
    """An official-layout state dict with random values (``seed=None``: stride-0 zeros, tiny on disk)."""
    if seed is None:
        return {k: torch.zeros(()).expand(s) for k, s in _shapes(shared, variant).items()}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in _shapes(shared, variant).items():
        if key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif len(shape) > 1:
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.1
    return state


def _logits(model: torch.nn.Module) -> torch.Tensor:
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(images)["pred_logits"]


def test_r50_official_to_detkit_load_and_back(tmp_path: Path, shared: Path) -> None:
    official = synthetic_official(shared, "detr_r50")
    src, dst, back = tmp_path / "detr-r50.pth", tmp_path / "detkit.pth", tmp_path / "official.pth"
    torch.save({"model": official, "epoch": 499}, src)
    assert main([str(src), "--format", "auto", "--config", str(CONFIGS / "detr_r50.yaml"), "--out", str(dst)]) == 0

    ckpt = load_checkpoint_file(dst)
    assert {"model", "config", "classes", "detkit_version"} <= set(ckpt)
    classes = ckpt["classes"]
    assert len(classes) == 91 and classes[1] == "person" and classes[90] == "toothbrush"
    assert classes[0] == classes[12] == classes[83] == "N/A" and len(set(classes) - {"N/A"}) == 80
    assert ckpt["config"]["model"]["type"] == "detr" and ckpt["config"]["data"]["label_map"] == "coco_official"

    model = build_model(ckpt["config"]["model"])
    fresh_out = _logits(model)
    report = load_state_dict(model, ckpt["model"], strict=True)
    assert report.ok and len(report.loaded) == len(official)
    own = model.state_dict()
    assert torch.equal(own["head.class_embed.weight"], official["class_embed.weight"])
    assert torch.equal(own["neck.proj.weight"], official["input_proj.weight"])
    key = "layer4.2.bn3.running_var"
    assert torch.equal(own[f"backbone.body.{key}"], official[f"backbone.0.body.{key}"])

    # the loaded weights decide the outputs: a second model from the same file agrees, the fresh one did not
    second = build_model(compose(CONFIGS / "detr_r50.yaml").model)
    load_state_dict(second, load_checkpoint_file(dst)["model"])
    out = _logits(model)
    assert torch.isfinite(out).all()
    assert torch.equal(out, _logits(second))
    assert not torch.allclose(out, fresh_out, atol=1e-3)

    # and back: official -> detkit -> official is the identity (keys, order, values)
    assert main([str(dst), "--to", "official", "--out", str(back)]) == 0
    again = load_checkpoint_file(back)["model"]
    assert list(again) == list(official)
    assert all(torch.equal(again[k], official[k]) for k in official)


def test_r101_round_trip_on_state_dicts(shared: Path) -> None:
    official = synthetic_official(shared, "detr_r101", seed=None)
    assert conv.looks_official(official) and not conv.looks_detkit(official)
    ours = conv.official_to_detkit(official)
    assert conv.looks_detkit(ours) and not conv.looks_official(ours)
    for config in ("detr_r101.yaml", "detr_r101_dc5.yaml"):
        with torch.device("meta"):
            model = build_model(compose(CONFIGS / config).model)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in ours.items()} == expected
    again = conv.detkit_to_official(ours)
    assert list(again) == list(official) and all(again[k] is official[k] for k in official)


def test_num_batches_tracked_is_dropped_and_unknown_keys_refused(shared: Path) -> None:
    official = synthetic_official(shared, "detr_r50", seed=None)
    official["backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(7)
    assert not any("num_batches_tracked" in k for k in conv.official_to_detkit(official))
    official["transformer.extra_token"] = torch.zeros(3)
    official["mystery.weight"] = torch.zeros(3)
    with pytest.raises(Exception, match="mystery.weight"):
        conv.official_to_detkit(official)


def _convert(tmp_path: Path, ckpt: dict, config: str, *extra: str) -> int:
    src = tmp_path / "src.pth"
    torch.save(ckpt, src)
    return main([str(src), "--config", str(CONFIGS / config), "--out", str(tmp_path / "out.pth"), *extra])


def test_refuses_checkpoints_that_do_not_fit(tmp_path: Path, shared: Path, capsys) -> None:
    r50 = synthetic_official(shared, "detr_r50", seed=None)
    wrong_classes = {**r50, "class_embed.weight": torch.zeros(21, 256), "class_embed.bias": torch.zeros(21)}
    assert _convert(tmp_path, {"model": wrong_classes}, "detr_r50.yaml", "--format", "detr") == 1
    err = capsys.readouterr().err
    assert "head.class_embed.weight (21, 256) (config expects (92, 256))" in err
    assert not (tmp_path / "out.pth").exists()
    # ... but fits once the config says 20 classes
    assert _convert(tmp_path, {"model": wrong_classes}, "detr_r50.yaml", "model.num_classes=20") == 0
    assert load_checkpoint_file(tmp_path / "out.pth")["classes"][:2] == ["class_0", "class_1"]

    r101 = synthetic_official(shared, "detr_r101", seed=None)
    assert _convert(tmp_path, {"model": r101}, "detr_r50.yaml") == 1
    err = capsys.readouterr().err
    assert "unexpected" in err and "backbone.body.layer3.6.conv1.weight" in err

    del r50["query_embed.weight"]
    assert _convert(tmp_path, {"model": r50}, "detr_r50.yaml") == 1
    assert "--format" in capsys.readouterr().err  # auto-detection found nothing


def test_pickled_official_file_needs_trust_pickle(tmp_path: Path, shared: Path, capsys) -> None:
    ckpt = {"model": synthetic_official(shared, "detr_r50", seed=None), "args": argparse.Namespace(lr=1e-4)}
    assert _convert(tmp_path, ckpt, "detr_r50.yaml") == 1
    assert "--trust-pickle" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="trust-pickle"):
        assert _convert(tmp_path, ckpt, "detr_r50.yaml", "--trust-pickle") == 0
    assert set(load_checkpoint_file(tmp_path / "out.pth")) >= {"model", "config", "classes", "detkit_version"}


def test_auto_format_detection(shared: Path) -> None:
    from detkit.weights.formats import detect_official as _detect

    assert _detect(synthetic_official(shared, "detr_r101", seed=None), Path("x.pth")) == "detr"
    assert _detect(synthetic_official(shared, "lwdetr_tiny", seed=None), Path("x.pth")) == "lwdetr"


def test_coco_class_layout() -> None:
    assert len(COCO_OFFICIAL_CLASSES) == 91
    unused = [i for i, n in enumerate(COCO_OFFICIAL_CLASSES) if n == "N/A"]
    assert unused == [0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    assert COCO_OFFICIAL_CLASSES[18] == "dog" and COCO_OFFICIAL_CLASSES[72] == "tv"


def test_tools_script_help() -> None:
    res = subprocess.run([sys.executable, str(REPO / "tools/convert_checkpoint.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--trust-pickle" in res.stdout and "--to" in res.stdout
