"""The detkit CLI: list/show/check, every shipped config checks, bad input gives one clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from detkit.cli import main
from tests.conftest import CONFIGS

ALL_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if "_base_" not in p.parts)


def test_there_are_configs():
    names = {p.name for p in ALL_CONFIGS}
    assert {"lwdetr_vit.yaml", "detr_r50.yaml"} <= names


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_check_every_config(config: Path, capsys):
    assert main(["check", str(config), "--quiet"]) == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    assert "total" in table and "backbone" in table


def test_list_and_show(capsys):
    assert main(["list", "backbone"]) == 0
    out = capsys.readouterr().out
    assert "resnet" in out and "detkit.models.backbones.resnet" in out
    assert main(["show", "backbone", "resnet"]) == 0
    out = capsys.readouterr().out
    assert "depth" in out and "frozen_stages" in out


def write_cfg(tmp_path: Path, model: dict, **sections) -> Path:
    path = tmp_path / "cfg.yaml"
    base = str(CONFIGS / "detr_r50.yaml")
    path.write_text(yaml.safe_dump({"defaults": [base], "model": model, **sections}))
    return path


BAD_INPUTS = [
    ({"backbone": {"type": "resnt"}}, [], "unknown backbone 'resnt'; did you mean 'resnet'?"),
    ({"backbone": {"type": "resnet", "dept": 50}}, [], "unexpected argument 'dept'; did you mean 'depth'?"),
    ({"backbone": {"type": "resnet", "depth": "fifty"}}, [], "argument 'depth' expects int, got 'fifty'"),
    ({}, ["train.epoch=3"], "unknown key 'train.epoch'; did you mean 'epochs'?"),
    ({}, ["train.epochs=three"], "'train.epochs' expects int | None, got 'three'"),  # null: derived
    ({}, ["plugins.disable=[nosuchplugin]"], "plugins.disable names plugins that are not installed: 'nosuchplugin'"),
]


@pytest.mark.parametrize("model,overrides,message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_one_clear_message(tmp_path, capsys, model, overrides, message):
    code = main(["check", str(write_cfg(tmp_path, model)), *overrides, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_missing_required_argument(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"type": "detr"}}))
    assert main(["check", str(cfg), "--quiet"]) == 2
    assert "missing required argument" in capsys.readouterr().err


def test_build_path_in_message(tmp_path, capsys):
    assert main(["check", str(write_cfg(tmp_path, {"backbone": {"type": "resnet", "depth": 42}})), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "while building backbone 'resnet'" in err and "while building detector 'detr'" in err


def test_missing_config_file(capsys):
    assert main(["check", "configs/nope.yaml"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_debug_shows_traceback(capsys):
    assert main(["check", "configs/nope.yaml", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_unknown_command(capsys):
    assert main(["chek"]) == 2
    assert "did you mean 'check'" in capsys.readouterr().err


def test_console_script_installed(run_cli):
    out = run_cli("list", "detector")
    assert out.returncode == 0 and "detr" in out.stdout and "lwdetr" in out.stdout
