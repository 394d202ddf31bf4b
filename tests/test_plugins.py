"""Entry-point plugins: discovery, origin reporting, failure isolation, disabling, local imports, hooks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def fake_distribution(root: Path, dist: str, version: str, module: str, source: str, ep_name: str | None = None) -> Path:
    """Write an installed-looking distribution (dist-info + module) under ``root``, as pip would."""
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[detkit.plugins]\n{ep_name or dist} = {module}\n")
    (root / f"{module}.py").write_text(source)
    return root


GOOD = '''
import torch.nn as nn
from detkit.registry import NECKS
from detkit.plugins import hookimpl

@NECKS.register("identity_neck")
class IdentityNeck(nn.Module):
    """Returns its input."""
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale
    def forward(self, feats):
        return feats

CALLS = []

@hookimpl
def detkit_after_epoch(trainer, epoch, metrics):
    CALLS.append((epoch, dict(metrics)))
'''

BROKEN = "raise ImportError('libfoo.so: cannot open shared object file')\n"


def run_py(code: str, path: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    if path is not None:
        full["PYTHONPATH"] = os.pathsep.join([str(path), str(REPO)])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=REPO, timeout=300)


def detkit(args: list[str], path: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_py(f"import sys; from detkit.cli import main; sys.exit(main({args!r}))", path, env)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site")
    fake_distribution(root, "detkit-goodneck", "2.3.4", "goodneck", GOOD, ep_name="goodneck")
    fake_distribution(root, "detkit-broken", "0.0.1", "brokenplug", BROKEN, ep_name="brokenplug")
    return root


def test_list_shows_plugin_origin_and_survives_broken_plugin(site):
    out = detkit(["list", "neck"], site)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if "identity_neck" in l)
    assert "detkit-goodneck 2.3.4 (goodneck)" in line
    assert "brokenplug" in out.stderr and "failed to import and is skipped" in out.stderr
    assert "libfoo.so" in out.stderr
    assert "failed plugin 'brokenplug'" in out.stdout


def test_lookup_error_names_failed_plugin(site):
    code = "from detkit.registry import BACKBONES\ntry:\n    BACKBONES.get('fancy')\nexcept KeyError as e:\n    print(e)"
    out = run_py(code, site)
    assert "unknown backbone 'fancy'" in out.stdout
    assert "plugin 'brokenplug' (detkit-broken) failed to load: ImportError: libfoo.so" in out.stdout


def test_autoload_can_be_disabled(site):
    out = detkit(["list", "neck"], site, env={"DETKIT_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert out.returncode == 0 and "identity_neck" not in out.stdout and "brokenplug" not in out.stderr


def test_config_disable(site):
    code = (
        "from detkit import plugins\nfrom detkit.registry import NECKS\n"
        "assert 'identity_neck' in NECKS\n"
        "plugins.configure(disable=['goodneck'])\n"
        "assert 'identity_neck' not in NECKS\n"
        "assert [p['name'] for p in plugins.loaded_plugins()] == []\n"
        "print('ok')"
    )
    out = run_py(code, site)
    assert out.stdout.strip().endswith("ok"), out.stderr


def test_config_disable_unknown_name_is_error(site):
    code = (
        "from detkit import plugins\n"
        "try:\n    plugins.configure(disable=['goodnek'])\n"
        "except Exception as e:\n    print(type(e).__name__, e)"
    )
    out = run_py(code, site)
    assert "PluginError" in out.stdout and "'goodnek'; did you mean 'goodneck'?" in out.stdout
    assert "not installed" in out.stdout


def test_loaded_plugins_recorded(site):
    out = run_py("from detkit import plugins; print(plugins.loaded_plugins())", site)
    assert "'distribution': 'detkit-goodneck', 'version': '2.3.4'" in out.stdout


def test_local_imports_register_components_and_hooks(tmp_path):
    (tmp_path / "my_local_neck.py").write_text(GOOD)
    code = (
        "from detkit import plugins\nfrom detkit.registry import NECKS\n"
        "plugins.configure(imports=['my_local_neck'])\n"
        "print(NECKS.entry('identity_neck').origin)\n"
        "plugins.plugin_manager().hook.detkit_after_epoch(trainer=None, epoch=3, metrics={'loss': 1.5})\n"
        "import my_local_neck; print(my_local_neck.CALLS)"
    )
    out = run_py(code, tmp_path, env={"DETKIT_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert out.returncode == 0, out.stderr
    assert "local module my_local_neck" in out.stdout
    assert "[(3, {'loss': 1.5})]" in out.stdout


def test_local_import_failure_is_clear(tmp_path):
    code = (
        "from detkit import plugins\n"
        "try:\n    plugins.configure(imports=['does_not_exist_mod'])\n"
        "except Exception as e:\n    print(type(e).__name__, e)"
    )
    out = run_py(code, tmp_path, env={"DETKIT_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert "PluginError plugins.imports: cannot import 'does_not_exist_mod'" in out.stdout


def test_duplicate_registration_by_plugin_names_both(tmp_path):
    clash = "from detkit.registry import BACKBONES\n@BACKBONES.register('resnet')\ndef resnet():\n    return None\n"
    fake_distribution(tmp_path, "detkit-clash", "1.0", "clashmod", clash, ep_name="clash")
    out = detkit(["list", "backbone"], tmp_path)
    assert out.returncode == 0
    assert "registered twice: first by detkit.models.backbones.resnet, again by detkit-clash 1.0 (clashmod)" in out.stderr


def test_hookspecs_documented():
    from detkit import hookspecs

    names = [n for n in dir(hookspecs) if n.startswith("detkit_")]
    assert names == sorted(["detkit_train_start", "detkit_after_step", "detkit_after_epoch", "detkit_after_eval",
                            "detkit_train_end"])
    assert all(getattr(hookspecs, n).__doc__ for n in names)
