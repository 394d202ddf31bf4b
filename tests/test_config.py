"""Config composition: defaults, merge rules, overrides, interpolation, schema validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from detkit.config import compose, merge, save_resolved
from detkit.errors import ConfigError


def write(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    write(tmp_path / "_base_/models/vitdet.yaml", {"model": {
        "type": "lwdetr", "hidden_dim": 256, "group_detr": 13,
        "backbone": {"type": "vit", "embed_dim": 192, "depth": 6, "window_blocks": [0, 2, 4]},
        "neck": {"type": "multiscale_projector", "out_channels": "${model.hidden_dim}"}}})
    write(tmp_path / "_base_/schedules/short.yaml", {"train": {"epochs": 3, "lr": 2e-4}})
    write(tmp_path / "main.yaml", {
        "defaults": ["_base_/models/vitdet.yaml", "_base_/schedules/short.yaml"],
        "model": {"backbone": {"window_blocks": [1]}},
        "train": {"epochs": 5}})
    return tmp_path / "main.yaml"


def test_defaults_then_body(tree):
    cfg = compose(tree)
    assert cfg.train.epochs == 5 and cfg.train.lr == 2e-4  # body over defaults, defaults kept
    assert cfg.model.backbone.depth == 6  # mappings merge by key
    assert list(cfg.model.backbone.window_blocks) == [1]  # lists replace
    assert cfg.train.batch_size == 4  # schema default filled in


def test_overrides_and_late_interpolation(tree):
    cfg = compose(tree, ["model.hidden_dim=384", "train.epochs=50", "data.root=/x/y"])
    assert cfg.model.neck.out_channels == 384  # interpolation resolved after overrides
    assert cfg.train.epochs == 50 and cfg.data.root == "/x/y"


def test_changed_type_replaces_node(tree):
    cfg = compose(tree, ["model.backbone={type: timm, name: convnext_tiny}"])
    assert dict(cfg.model.backbone) == {"type": "timm", "name": "convnext_tiny"}  # no stale ViT keys
    same = compose(tree, ["model.backbone={type: vit, depth: 12}"])
    assert same.model.backbone.depth == 12 and same.model.backbone.embed_dim == 192


def test_merge_rules_plain():
    base = {"a": {"type": "x", "k": 1}, "l": [1, 2], "m": {"n": 1}}
    assert merge(base, {"a": {"type": "y"}}) == {"a": {"type": "y"}, "l": [1, 2], "m": {"n": 1}}
    assert merge(base, {"l": [3]})["l"] == [3]
    assert merge(base, {"m": {"o": 2}})["m"] == {"n": 1, "o": 2}
    assert base["m"] == {"n": 1}  # inputs untouched


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope.yaml"):
        compose(tmp_path / "nope.yaml")


def test_missing_defaults_entry_names_includer(tmp_path):
    write(tmp_path / "models.yaml", {"model": {"type": "detr"}})
    main = write(tmp_path / "main.yaml", {"defaults": ["model.yaml"]})
    with pytest.raises(ConfigError) as info:
        compose(main)
    msg = str(info.value)
    assert "model.yaml" in msg and "listed in defaults of" in msg and "main.yaml" in msg
    assert "did you mean 'models.yaml'" in msg


def test_include_cycle(tmp_path):
    write(tmp_path / "a.yaml", {"defaults": ["b.yaml"]})
    write(tmp_path / "b.yaml", {"defaults": ["a.yaml"]})
    with pytest.raises(ConfigError, match=r"include cycle in config defaults: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        compose(tmp_path / "a.yaml")


def test_schema_typo_gets_full_key(tree):
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch'; did you mean 'epochs'\?"):
        compose(tree, ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'runtime.outptu_dir'; did you mean 'output_dir'\?"):
        compose(tree, ["runtime.outptu_dir=x"])


def test_schema_wrong_type(tree):
    with pytest.raises(ConfigError, match=r"'train.epochs' expects int \| None, got 'many'"):  # null: derived
        compose(tree, ["train.epochs=many"])
    with pytest.raises(ConfigError, match=r"'train.lr' expects float, got True"):
        compose(tree, ["train.lr=true"])
    assert compose(tree, ["train.lr=1"]).train.lr == 1  # an int is a fine float


def test_unknown_top_level(tree):
    with pytest.raises(ConfigError, match=r"unknown top-level key 'trian'; did you mean 'train'\?"):
        compose(tree, ["trian.epochs=3"])


def test_bad_override_syntax(tree):
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        compose(tree, ["train.epochs"])


def test_bad_interpolation(tree):
    with pytest.raises(ConfigError, match="cannot resolve config"):
        compose(tree, ["model.neck.out_channels=${model.hidden_dims}"])


def test_yaml_syntax_error(tmp_path):
    bad = write(tmp_path / "bad.yaml", "model: {type: detr\n")
    with pytest.raises(ConfigError, match=r"cannot parse .*bad.yaml"):
        compose(bad)


def test_result_is_read_only(tree):
    cfg = compose(tree)
    with pytest.raises(Exception):
        cfg.train.epochs = 1


def test_save_resolved(tree, tmp_path):
    cfg = compose(tree, ["model.hidden_dim=128"])
    path = save_resolved(cfg, tmp_path / "run")
    saved = yaml.safe_load(path.read_text())
    assert saved["model"]["neck"]["out_channels"] == 128  # resolved, not "${...}"
    assert saved["train"]["epochs"] == 5 and "batch_size" in saved["train"]
    assert compose(path).model.neck.out_channels == 128  # a saved config composes again


def test_exponent_floats(tree, tmp_path):
    cfg = compose(tree, ["train.lr=1e-3", "train.weight_decay=5E-5"])
    assert cfg.train.lr == 1e-3 and cfg.train.weight_decay == 5e-5
    f = write(tmp_path / "e.yaml", "train: {lr: 2e-4, epochs: 3}\n")
    assert compose(f).train.lr == 2e-4
