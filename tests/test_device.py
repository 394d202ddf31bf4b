"""The one device rule (:mod:`detkit.engine.device`) and the CPU-only settings of the shipped configs.

No test here touches CUDA: a GPU machine, a broken driver or several visible GPUs are simulated by monkeypatching
``torch.cuda`` and ``torch.version``, so every case runs on a CPU-only machine.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.engine import tiny_config  # noqa: E402
from support.tiny_detector import TinyShapes  # noqa: E402
from support.tools import make_checkpoint, tiny_lwdetr_config  # noqa: E402

from detkit.cli import main  # noqa: E402
from detkit.config import DataConfig, RuntimeConfig, compose, for_device  # noqa: E402
from detkit.engine import device as device_module  # noqa: E402
from detkit.engine import distributed as du  # noqa: E402
from detkit.errors import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))
TOO_OLD = ("CUDA initialization: The NVIDIA driver on your system is too old (found version 11040). Please update "
           "your GPU driver")


@pytest.fixture
def fallback_log(monkeypatch):
    """The records of ``detkit.device`` (whatever handlers the ``detkit`` logger has), with the once-flag reset."""
    monkeypatch.setattr(device_module, "_fallback_reported", False)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("detkit.device")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def no_launch_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)


def fake_cuda(monkeypatch, *, build: str | None = "12.4", count: int = 0, available: bool | None = None,
              warning: str | None = None, init_error: str | None = None) -> None:
    """Make ``torch`` look like a machine with ``count`` GPUs (usable unless ``available`` is False)."""
    usable = count > 0 if available is None else available

    def is_available() -> bool:
        if warning:
            warnings.warn(warning, UserWarning, stacklevel=2)
        return usable

    def init() -> None:
        if init_error:
            raise RuntimeError(init_error)

    monkeypatch.setattr(torch.version, "cuda", build)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "init", init)


# ---------------------------------------------------------------------------------------------------------------------
# auto falls back to the CPU once, with the reason
# ---------------------------------------------------------------------------------------------------------------------


def fallback_message(records: list[logging.LogRecord]) -> str:
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.WARNING
    return records[0].getMessage()


def test_auto_without_a_cuda_build_says_so(monkeypatch, fallback_log, no_launch_env):
    fake_cuda(monkeypatch, build=None, count=0)
    assert du.resolve_device("auto") == torch.device("cpu")
    message = fallback_message(fallback_log)
    assert "running on the CPU" in message and "no CUDA support" in message and "torch.version.cuda is None" in message


def test_auto_with_no_visible_gpu_says_so(monkeypatch, fallback_log, no_launch_env):
    fake_cuda(monkeypatch, count=0, init_error="Found no NVIDIA driver on your system.")
    assert du.resolve_device("auto") == torch.device("cpu")
    message = fallback_message(fallback_log)
    assert "no GPU is visible" in message and "Found no NVIDIA driver" in message  # torch's own words


def test_auto_with_an_empty_cuda_visible_devices_names_it(monkeypatch, fallback_log, no_launch_env):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    fake_cuda(monkeypatch, count=0)
    assert du.resolve_device("auto") == torch.device("cpu")
    assert "CUDA_VISIBLE_DEVICES is set and empty" in fallback_message(fallback_log)


def test_auto_with_a_driver_too_old_gives_torchs_warning(monkeypatch, fallback_log, no_launch_env):
    # torch counts the GPUs through NVML, but CUDA does not start: is_available() warns and returns False
    fake_cuda(monkeypatch, count=2, available=False, warning=TOO_OLD, init_error="not the text we want")
    assert du.resolve_device("auto") == torch.device("cpu")
    message = fallback_message(fallback_log)
    assert "CUDA failed to start" in message and "driver on your system is too old (found version 11040)" in message
    assert "not the text we want" not in message


def test_auto_with_a_driver_too_old_after_torch_already_warned(monkeypatch, fallback_log, no_launch_env):
    # torch warns only on the first query of a process: the reason then comes from starting CUDA
    fake_cuda(monkeypatch, count=2, available=False, init_error="The NVIDIA driver on your system is too old")
    assert du.resolve_device("auto") == torch.device("cpu")
    assert "torch says: The NVIDIA driver on your system is too old" in fallback_message(fallback_log)


def test_the_fallback_is_said_once_per_process(monkeypatch, fallback_log, no_launch_env):
    fake_cuda(monkeypatch, count=0)
    for _ in range(3):
        assert du.resolve_device("auto") == torch.device("cpu")
    fallback_message(fallback_log)
    assert du.resolve_device("cpu") == torch.device("cpu")
    assert len(fallback_log) == 1


def test_a_cuda_device_without_a_gpu_is_a_clear_error(monkeypatch, fallback_log, no_launch_env):
    fake_cuda(monkeypatch, count=0, init_error="Found no NVIDIA driver on your system.")
    with pytest.raises(ConfigError, match=r"device 'cuda' needs a GPU, but no GPU is visible.*no NVIDIA driver"):
        du.resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"unknown device 'gpu'"):
        du.resolve_device("gpu")


# ---------------------------------------------------------------------------------------------------------------------
# which GPU a process takes
# ---------------------------------------------------------------------------------------------------------------------


def test_a_process_that_sees_one_gpu_uses_it_whatever_local_rank_says(monkeypatch, no_launch_env):
    fake_cuda(monkeypatch, count=1)  # SLURM: one task per GPU, CUDA_VISIBLE_DEVICES=3, LOCAL_RANK=3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert du.resolve_device("auto") == torch.device("cuda", 0)
    assert du.resolve_device("cuda") == torch.device("cuda", 0)
    assert du.init_distributed("auto").device == torch.device("cuda", 0)


def test_several_visible_gpus_give_each_local_rank_its_own(monkeypatch, no_launch_env):
    fake_cuda(monkeypatch, count=4)
    assert [du.resolve_device("auto", rank) for rank in range(4)] == [torch.device("cuda", i) for i in range(4)]
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=5 but this process sees 4 GPUs"):
        du.resolve_device("auto", 5)
    with pytest.raises(ConfigError, match=r"device 'cuda:4': this process sees 4 GPUs"):
        du.resolve_device("cuda:4")
    assert du.resolve_device("cuda:3", 0) == torch.device("cuda", 3)  # an explicit index is kept


def test_torchrun_ranks_get_their_gpu_and_nccl(monkeypatch, no_launch_env):
    fake_cuda(monkeypatch, count=4)
    monkeypatch.setenv("RANK", "6")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "2")  # second node, third GPU
    calls: dict[str, object] = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: calls.setdefault("set_device", dev))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: calls.update(kwargs))
    info = du.init_distributed("auto", "auto", 60)
    assert info.device == torch.device("cuda", 2) and info.backend == "nccl"
    assert calls["set_device"] == torch.device("cuda", 2) and calls["backend"] == "nccl"
    assert calls["device_id"] == torch.device("cuda", 2) and (calls["rank"], calls["world_size"]) == (6, 8)


# ---------------------------------------------------------------------------------------------------------------------
# configs: device auto everywhere, CPU tuning only on the CPU
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_says_device_auto(config: Path):
    assert compose(config).runtime.device == "auto"


def test_the_cpu_tuning_of_the_main_config_applies_only_on_the_cpu():
    cfg = compose(REPO / "configs" / "lwdetr_vit.yaml")
    on_cpu, on_gpu = for_device(cfg, "cpu"), for_device(cfg, "cuda")
    # make train on this 2-core machine: the same threads and workers as before the switch to device auto
    assert (on_cpu.runtime.threads, on_cpu.data.num_workers) == (2, 1)
    assert (on_gpu.runtime.threads, on_gpu.data.num_workers) == (RuntimeConfig().threads, DataConfig().num_workers)
    assert (on_gpu.runtime.threads, on_gpu.data.num_workers) != (2, 1)

def test_a_later_general_setting_wins_on_the_cpu_too(tmp_path):
    main_config = REPO / "configs" / "lwdetr_vit.yaml"
    cfg = compose(main_config, ["data.num_workers=0"])  # the command line, after the schedule's runtime.cpu
    assert (for_device(cfg, "cpu").runtime.threads, for_device(cfg, "cpu").data.num_workers) == (2, 0)
    cfg = compose(main_config, ["data.num_workers=8", "runtime.threads=4"])
    assert (for_device(cfg, "cpu").runtime.threads, for_device(cfg, "cpu").data.num_workers) == (4, 8)
    assert (for_device(cfg, "cuda").runtime.threads, for_device(cfg, "cuda").data.num_workers) == (4, 8)
    # one layer setting both: runtime.cpu is the CPU's
    cfg = compose(main_config, ["data.num_workers=8", "runtime.cpu.num_workers=3"])
    assert (for_device(cfg, "cpu").data.num_workers, for_device(cfg, "cuda").data.num_workers) == (3, 8)
    # a file inheriting the schedule and setting the general key
    child = tmp_path / "child.yaml"
    child.write_text(f"defaults: [{main_config}]\ndata: {{num_workers: 6}}\n")
    assert for_device(compose(child), "cpu").data.num_workers == 6
    assert for_device(compose(child), "cpu").runtime.threads == 2  # not set again: the CPU tuning stays


def test_runtime_cpu_keys_are_checked_with_did_you_mean():
    main_config = REPO / "configs" / "lwdetr_vit.yaml"
    with pytest.raises(ConfigError, match=r"unknown key 'runtime.cpu.thread'; did you mean 'threads'\?"):
        compose(main_config, ["runtime.cpu.thread=2"])
    with pytest.raises(ConfigError, match=r"'runtime.cpu.num_workers' expects int \| None, got 'many'"):
        compose(main_config, ["runtime.cpu.num_workers=many"])
    with pytest.raises(ConfigError, match=r"'runtime.cpu' expects a mapping, got 3"):
        compose(main_config, ["runtime.cpu=3"])
    assert dataclasses.asdict(RuntimeConfig())["cpu"] == {"threads": None, "num_workers": None}  # the defaults


def test_check_prints_the_effective_settings_here(monkeypatch, capsys, fallback_log, no_launch_env):
    fake_cuda(monkeypatch, count=0)
    assert main(["check", str(REPO / "configs" / "lwdetr_vit.yaml"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "runtime.device=auto -> cpu, runtime.threads=2, data.num_workers=1" in out


def test_the_trainer_on_the_cpu_uses_the_cpu_settings(monkeypatch, tmp_path, caplog, fallback_log, no_launch_env):
    fake_cuda(monkeypatch, count=0)
    caplog.set_level(logging.INFO, logger="detkit.train")  # as the train command's logging set-up does
    threads = torch.get_num_threads()
    cfg = tiny_config(tmp_path, ["runtime.device=auto", "runtime.threads=0", "data.num_workers=3",
                                 "runtime.cpu={threads: 1, num_workers: 0}"], epochs=1)
    from detkit.engine.trainer import Trainer

    try:
        trainer = Trainer(cfg, datasets=(TinyShapes(4), None))
        trainer._close_log_file()
        assert trainer.device == torch.device("cpu") and torch.get_num_threads() == 1
        assert trainer.cfg.data.num_workers == 0 and trainer._train_loader().num_workers == 0
        assert "running on the CPU" in fallback_message(fallback_log)
        assert "num_workers: 0" in (tmp_path / "run" / "config.yaml").read_text()  # the settings the run used
        line = next(x for x in (tmp_path / "run" / "train.log").read_text().splitlines() if "device cpu" in x)
        assert "runtime.device=auto" in line and "1 torch threads, data.num_workers=0" in line
        assert "on the CPU because no GPU is visible" in line  # the reason is in the run's log too
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------------
# every tool has the same default
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("device")
    cfg = tiny_lwdetr_config(tmp)
    return cfg, make_checkpoint(cfg, tmp / "ckpt.pth")


def test_train_eval_predict_bench_and_the_api_share_the_device_default(monkeypatch, tiny, tmp_path, capsys,
                                                                       fallback_log, no_launch_env):
    """Each entry point, given no device, asks the one rule (here told "no GPU" for a made-up reason)."""
    import numpy as np
    from PIL import Image

    import detkit

    monkeypatch.setattr(device_module, "cuda_unavailable_reason", lambda: "of reason 42")
    cfg, ckpt = tiny
    image = tmp_path / "image.png"
    Image.fromarray(np.full((64, 96, 3), 128, np.uint8)).save(image)

    def said_fallback() -> bool:
        said = any("running on the CPU because of reason 42" in r.getMessage() for r in fallback_log)
        fallback_log.clear()
        monkeypatch.setattr(device_module, "_fallback_reported", False)
        return said

    runs = {
        "Detector.from_checkpoint": lambda: detkit.Detector.from_checkpoint(ckpt).device.type == "cpu",
        "detkit predict": lambda: main(["predict", str(image), "--checkpoint", str(ckpt), "--out",
                                        str(tmp_path / "pred"), "--no-draw"]) == 0,
        "detkit bench": lambda: main(["bench", str(cfg), "--height", "64", "--width", "64", "--warmup", "0",
                                      "--iters", "1", "--no-flops"]) == 0,
        "detkit eval": lambda: main(["eval", str(cfg), "--checkpoint", str(ckpt), "runtime.device=auto"]) == 0,
        "the trainer (make train)": lambda: du.init_distributed(
            str(compose(REPO / "configs" / "lwdetr_vit.yaml").runtime.device)).device.type == "cpu",
    }
    results = {name: (run(), said_fallback()) for name, run in runs.items()}
    capsys.readouterr()
    assert results == {name: (True, True) for name in runs}
