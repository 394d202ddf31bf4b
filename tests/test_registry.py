"""Registry: registration, lookup errors, argument binding, nested build paths."""

from __future__ import annotations

import subprocess
import sys

import pytest

from detkit.errors import ConfigError, RegistryError
from detkit.registry import BACKBONES, REGISTRIES, Registry


@pytest.fixture
def reg() -> Registry:
    r = Registry("widget")
    # a private registry: make lookups skip the global plugin loading, which is tested elsewhere
    return r


def make(reg: Registry):
    @reg.register("conv_block")
    class ConvBlock:
        """A widget."""

        def __init__(self, channels: int, kernel_size: int = 3, act: str = "relu", scales: list[int] = (1,)):
            self.channels, self.kernel_size, self.act, self.scales = channels, kernel_size, act, scales

    @reg.register("pair")
    def pair(left: dict, right: dict, width: int = 1):
        return (reg.build(left, kernel_size=width), reg.build(right))

    @reg.register("exploding")
    def exploding(depth: int):
        raise RuntimeError(f"depth {depth} is too deep")

    return ConvBlock


def test_register_and_build(reg):
    cls = make(reg)
    obj = reg.build({"type": "conv_block", "channels": 8})
    assert isinstance(obj, cls) and obj.channels == 8 and obj.kernel_size == 3
    assert "conv_block" in reg and reg.names() == ["conv_block", "exploding", "pair"]


def test_duplicate_names_both_origins(reg):
    make(reg)
    with pytest.raises(RegistryError) as info:
        @reg.register("conv_block")
        def other(channels: int):  # noqa: ARG001
            return None
    msg = str(info.value)
    assert "registered twice" in msg and msg.count("test_registry") == 2


def test_unknown_name_suggests(reg):
    make(reg)
    with pytest.raises(RegistryError, match=r"unknown widget 'conv_blok'; did you mean 'conv_block'\?"):
        reg.get("conv_blok")
    with pytest.raises(RegistryError, match=r"known: conv_block, exploding, pair"):
        reg.get("zzz")


def test_unexpected_argument_suggests(reg):
    make(reg)
    with pytest.raises(ConfigError, match=r"unexpected argument 'kernel_sise'; did you mean 'kernel_size'\?"):
        reg.build({"type": "conv_block", "channels": 8, "kernel_sise": 5})


def test_missing_required_arguments_listed(reg):
    make(reg)
    with pytest.raises(ConfigError, match=r"missing required argument 'channels'"):
        reg.build({"type": "conv_block"})


def test_wrong_type(reg):
    make(reg)
    with pytest.raises(ConfigError, match=r"argument 'channels' expects int, got 'eight'"):
        reg.build({"type": "conv_block", "channels": "eight"})
    with pytest.raises(ConfigError, match=r"argument 'scales' expects"):
        reg.build({"type": "conv_block", "channels": 1, "scales": [1, "x"]})
    assert reg.build({"type": "conv_block", "channels": 1, "scales": [1, 2]}).scales == [1, 2]


def test_injected_values(reg):
    make(reg)
    left, right = reg.build({"type": "pair", "width": 7, "left": {"type": "conv_block", "channels": 1},
                             "right": {"type": "conv_block", "channels": 2}})
    assert left.kernel_size == 7 and right.kernel_size == 3
    # a derived value may not be set in the config too
    with pytest.raises(ConfigError, match="'kernel_size' is derived"):
        reg.build({"type": "pair", "left": {"type": "conv_block", "channels": 1, "kernel_size": 3},
                   "right": {"type": "conv_block", "channels": 2}})
    # an injected value the factory does not accept is dropped
    assert reg.build({"type": "conv_block", "channels": 1}, unused=5).channels == 1


def test_nested_build_path_notes_keep_original(reg):
    make(reg)
    with pytest.raises(RuntimeError, match="depth 3 is too deep") as info:
        reg.build({"type": "pair", "left": {"type": "conv_block", "channels": 1}, "right": {"type": "exploding", "depth": 3}})
    assert info.value.__notes__ == ["while building widget 'exploding'", "while building widget 'pair'"]
    with pytest.raises(RegistryError) as info:
        reg.build({"type": "pair", "left": {"type": "conv_blok"}, "right": {"type": "exploding", "depth": 3}})
    assert "did you mean 'conv_block'" in str(info.value)
    assert info.value.__notes__ == ["while building widget 'pair'"]


def test_node_without_type(reg):
    make(reg)
    with pytest.raises(ConfigError, match="has no 'type' key"):
        reg.build({"channels": 3})
    with pytest.raises(ConfigError, match="must be a mapping"):
        reg.build("conv_block")


def test_snake_case_names(reg):
    with pytest.raises(RegistryError, match="snake_case"):
        reg.register("ConvBlock")(lambda: None)


def test_registries_declared():
    expected = {"backbone", "neck", "position_encoding", "transformer", "head", "matcher", "loss", "detector",
                "dataset", "transform", "postprocessor", "callback"}
    assert expected <= set(REGISTRIES)


def test_builtins_load_lazily():
    code = (
        "import sys, detkit, detkit.registry as r; "
        "assert 'torch' not in sys.modules, 'import detkit must stay cheap'; "
        "assert not r.BACKBONES._entries; "
        "assert 'resnet' in r.BACKBONES; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_builtin_origin_is_module():
    assert BACKBONES.entry("resnet").origin == "detkit.models.backbones.resnet"
