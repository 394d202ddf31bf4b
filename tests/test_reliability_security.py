"""Untrusted inputs never run code: checkpoints (every entry point that loads one), configs, plugin loading.

- Every ``torch.load(`` call in the package passes ``weights_only=True``, except the converter's explicit
  ``--trust-pickle`` branch (checked on the syntax tree, so a new call site cannot slip in unnoticed).
- A checkpoint that would run a shell command when unpickled is refused with a message that says why and how to
  convert a trusted legacy file, by resume (path and ``auto``), ``finetune_from``, ``model.init_from``,
  ``model.backbone.weights``, ``detkit predict/eval/export/bench --checkpoint`` and ``detkit convert`` (both
  directions) — and the command never runs.
- Configs never import or evaluate code: YAML python tags are refused (files and overrides), a ``type:`` naming an
  import path is just an unknown name (the module is never imported), and the only OmegaConf resolvers are
  OmegaConf's own ``oc.*`` ones.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.engine import REPO, tiny_config  # noqa: E402
from support.tiny_detector import TinyShapes  # noqa: E402

from detkit import cli  # noqa: E402
from detkit.config import compose  # noqa: E402
from detkit.engine.trainer import Trainer  # noqa: E402
from detkit.errors import CheckpointError, ConfigError, RegistryError  # noqa: E402
from detkit.models.build import build_model  # noqa: E402
from detkit.registry import CALLBACKS, DATASETS, DETECTORS, TRANSFORMS  # noqa: E402


class Evil:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(tmp_path: Path, name: str = "evil.pth") -> tuple[Path, Path]:
    """A checkpoint that looks like a detkit one (weights, config, classes) with a code-running object inside."""
    marker = tmp_path / f"pwned-{name}"
    path = tmp_path / name
    from support.tiny_detector import TinyDetector

    model = TinyDetector(num_classes=3)
    torch.save({"model": model.state_dict(), "classes": ["red", "green", "blue"],
                "config": {"model": {"type": "tiny_test", "num_classes": 3}}, "args": Evil(marker)}, path)
    return path, marker


def _assert_refused(message: str, path: Path) -> None:
    assert "refusing to load" in message and str(path) in message, message
    assert "weights_only=True" in message and "--trust-pickle" in message, message  # why, and how to convert


def datasets():
    return TinyShapes(8), TinyShapes(4, seed=1, flip=False)


# ---------------------------------------------------------------------------------------------------------------------
# torch.load call sites
# ---------------------------------------------------------------------------------------------------------------------


def _torch_load_calls(path: Path) -> list[tuple[int, str, ast.Call]]:
    """``(line, enclosing function, call)`` of every ``torch.load(...)`` / ``serialization.load(...)`` / bare
    ``load(...)`` imported from torch in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    bare = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
            and (n.module or "").startswith("torch") for a in n.names if a.name == "load"}
    out = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.Call):
                f = child.func
                hit = (isinstance(f, ast.Attribute) and f.attr == "load"
                       and isinstance(f.value, (ast.Name, ast.Attribute))
                       and ast.unparse(f.value) in ("torch", "torch.serialization", "serialization")) \
                    or (isinstance(f, ast.Name) and f.id in bare)
                if hit:
                    out.append((child.lineno, func, child))
            visit(child, name)

    visit(tree, "<module>")
    return out


def test_every_torch_load_passes_weights_only_true_except_the_trust_pickle_converter(tmp_path):
    files = [p for d in ("detkit", "tools", "plugins") for p in (REPO / d).rglob("*.py")]
    assert len(files) > 20
    calls = {(str(p.relative_to(REPO)), line, func): call for p in files for line, func, call in _torch_load_calls(p)}
    assert calls, "no torch.load call found at all: the scan is broken"
    unsafe = []
    for (rel, line, func), call in calls.items():
        kw = {k.arg: k.value for k in call.keywords}
        safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
        if not safe:
            unsafe.append((rel, func))
    # the one exception: the converter's --trust-pickle branch, which warns and is never reached by default
    assert unsafe == [("detkit/convert/cli.py", "_read")], unsafe
    source = (REPO / "detkit/convert/cli.py").read_text()
    read_fn = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == "_read")
    guard = next(n for n in read_fn.body if isinstance(n, ast.If))  # before any other branch: the safe return
    assert ast.unparse(guard.test) == "not trust_pickle" and "load_checkpoint_file" in ast.unparse(guard.body[0])
    # and the scanner does find unsafe calls (so the assertion above can fail)
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\nfrom torch import load as L\ndef f(p):\n"
                     "    torch.load(p)\n    L(p, weights_only=False)\n")
    assert [(line, func) for line, func, _ in _torch_load_calls(probe)] == [(4, "f"), (5, "f")]


# ---------------------------------------------------------------------------------------------------------------------
# code-running checkpoints at every entry point
# ---------------------------------------------------------------------------------------------------------------------


def test_trainer_entry_points_refuse_code_running_checkpoints(tmp_path):
    evil, marker = _evil_checkpoint(tmp_path)
    cases = {
        "resume": dict(overrides=[], train={"resume": str(evil)}),
        "finetune_from": dict(overrides=[], train={"finetune_from": str(evil)}),
        "model.init_from": dict(overrides=[f"model.init_from={evil}"], train={}),
    }
    for name, case in cases.items():
        with pytest.raises(CheckpointError) as err:
            Trainer(tiny_config(tmp_path, case["overrides"], name=name.replace(".", "_"), **case["train"]),
                    datasets=datasets())
        _assert_refused(str(err.value), evil)
        assert not list((tmp_path / name.replace(".", "_")).glob("*.pth")), name
    # resume=auto picks the run directory's checkpoint_last.pth: same refusal
    run = tmp_path / "auto"
    run.mkdir()
    (run / "checkpoint_last.pth").write_bytes(evil.read_bytes())
    with pytest.raises(CheckpointError) as err:
        Trainer(tiny_config(tmp_path, name="auto", resume="auto"), datasets=datasets())
    _assert_refused(str(err.value), run / "checkpoint_last.pth")
    assert not marker.exists()


def test_backbone_weights_refuse_code_running_checkpoints(tmp_path):
    evil, marker = _evil_checkpoint(tmp_path)
    from detkit.weights import apply as pretrained

    model = torch.nn.Module()
    model.backbone = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError) as err:
        pretrained.load_backbone_weights(model, str(evil))
    _assert_refused(str(err.value), evil)
    assert not marker.exists()


def _tiny_cli_config(tmp_path: Path) -> Path:
    body = {
        "model": {"type": "tiny_test", "num_classes": 3},
        "data": {"num_workers": 0, "synthetic": {"image_size": 32, "num_train": 2, "num_val": 2,
                                                  "shapes": ["circle", "square", "triangle"]},
                 "train_transforms": None, "val_transforms": None},
        "runtime": {"device": "cpu", "output_dir": str(tmp_path / "cli_run")},
        "plugins": {"imports": ["support.tiny_detector"]},
    }
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_cli_entry_points_refuse_code_running_checkpoints(tmp_path, capsys):
    evil, marker = _evil_checkpoint(tmp_path)
    cfg = str(_tiny_cli_config(tmp_path))
    image = tmp_path / "img.png"
    import cv2
    import numpy as np

    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    commands = {
        "predict": ["predict", str(image), "--checkpoint", str(evil), "--out", str(tmp_path / "pred"), "--device",
                    "cpu"],
        "eval": ["eval", cfg, "--checkpoint", str(evil), "--device", "cpu"],
        "export": ["export", "--checkpoint", str(evil), "--out", str(tmp_path / "m.onnx")],
        "bench": ["bench", cfg, "--checkpoint", str(evil), "--height", "32", "--width", "32", "--iters", "1",
                  "--warmup", "0", "--no-flops"],
    }
    for name, argv in commands.items():
        assert cli.main(argv) == 2, name  # a user error: one message, no traceback
        _assert_refused(capsys.readouterr().err, evil)
    # the converter without --trust-pickle, both directions
    assert cli.main(["convert", str(evil), "--out", str(tmp_path / "c.pth"), "--config", cfg]) == 1
    _assert_refused(capsys.readouterr().err, evil)
    assert cli.main(["convert", str(evil), "--out", str(tmp_path / "c.pth"), "--to", "official"]) == 1
    _assert_refused(capsys.readouterr().err, evil)
    assert not marker.exists() and not (tmp_path / "c.pth").exists()


# ---------------------------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/new:os.system",
                                 "!!python/name:os.system", "!!python/module:os"])
def test_yaml_python_tags_are_refused(tmp_path, tag):
    marker = tmp_path / "pwned"
    value = f'{tag} ["touch {marker}"]' if "apply" in tag or "new" in tag else f"{tag} ''"
    path = tmp_path / "evil.yaml"
    path.write_text(f"model:\n  type: tiny_test\n  hidden_dim: {value}\n")
    with pytest.raises(ConfigError, match=r"cannot parse .*evil\.yaml") as err:
        compose(path)
    assert "python/" in str(err.value)  # names the offending tag
    # in a file pulled in through defaults, and in a command-line override
    (tmp_path / "top.yaml").write_text("defaults: [evil.yaml]\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        compose(tmp_path / "top.yaml")
    (tmp_path / "ok.yaml").write_text("model: {type: tiny_test}\n")
    with pytest.raises(ConfigError, match="cannot parse value"):
        compose(tmp_path / "ok.yaml", [f"model.hidden_dim={value}"])
    assert not marker.exists()


def test_type_naming_an_import_path_is_just_an_unknown_name(tmp_path, monkeypatch):
    # a module on sys.path whose import would leave a marker: no config may make detkit import it
    marker = tmp_path / "imported"
    (tmp_path / "evil_mod_rel.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef run(**kw):\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for registry in (DETECTORS, DATASETS, TRANSFORMS, CALLBACKS):
        for name in ("os.system", "builtins.eval", "evil_mod_rel.run", "subprocess.Popen"):
            with pytest.raises(RegistryError, match=f"unknown .*{name}"):
                registry.build({"type": name})
    path = tmp_path / "c.yaml"
    path.write_text("model: {type: evil_mod_rel.run}\n")
    with pytest.raises(RegistryError, match="unknown detector 'evil_mod_rel.run'"):
        build_model(compose(path).model)
    # nested: a DETR whose backbone names builtins.eval fails at the backbone lookup, naming the build path
    with pytest.raises(RegistryError, match="unknown backbone 'builtins.eval'") as err, torch.device("meta"):
        build_model(compose(REPO / "configs" / "detr_r50.yaml", ["model.backbone={type: builtins.eval}"]).model)
    assert "while building detector 'detr'" in "\n".join(getattr(err.value, "__notes__", []))
    with pytest.raises(RegistryError, match="unknown callback 'evil_mod_rel.run'"):
        Trainer(tiny_config(tmp_path, name="cb", callbacks=[{"type": "evil_mod_rel.run"}]), datasets=datasets())
    assert "evil_mod_rel" not in sys.modules and not marker.exists()
    # only plugins.imports imports a local module
    from detkit import plugins

    try:
        Trainer(tiny_config(tmp_path, ["plugins.imports=[support.tiny_detector, evil_mod_rel]"], name="imp"),
                datasets=datasets())
        assert marker.exists()
    finally:
        sys.modules.pop("evil_mod_rel", None)
        plugins._loaded.pop("local:evil_mod_rel", None)  # later tests record the loaded plugins


def test_only_omegaconf_builtin_resolvers_exist_and_none_runs_code(tmp_path, monkeypatch):
    from omegaconf.basecontainer import BaseContainer

    import detkit.models.build  # noqa: F401  (everything that could register a resolver is imported)
    import detkit.plugins as plugins

    plugins.ensure_loaded()
    # OmegaConf's own resolvers live in the reserved ``oc.`` namespace (env, create, decode, select, coerce, ...):
    # they read values and parse literals; none imports or evaluates Python
    names = set(BaseContainer._resolvers)
    assert names and all(n.startswith("oc.") for n in names), names
    assert not [p for d in ("detkit", "tools") for p in (REPO / d).rglob("*.py")
                if "register_new_resolver" in p.read_text() or "register_resolver" in p.read_text()]
    marker = tmp_path / "pwned"
    for expr in (f"${{eval:__import__('os').system('touch {marker}')}}", "${python:os.system}",
                 "x${oc.env:HOME}"):
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({"model": {"type": "tiny_test", "note": expr}}))
        if "oc." in expr:  # the built-ins read values, they do not evaluate Python
            cfg = compose(path)
            assert cfg.model.note == f"x{os.environ['HOME']}"
        else:
            with pytest.raises(ConfigError, match="cannot resolve config key 'model.note'"):
                compose(path)
    assert not marker.exists()
