"""Long runs: resident memory stays flat over many training iterations on CPU.

The test detector, and small real DETR and LW-DETR models, each train 120 optimizer steps (60 epochs of 2 steps) with
evaluation every 10 epochs, a checkpoint every 10 steps, EMA and the metrics logger: everything a long run repeats.
Resident memory (``/proc/self/statm``) is sampled after every step; after a warm-up of 30 steps it may grow by at most
``BOUND_MB`` = 10 MB over the remaining 90 steps (measured: under 1.5 MB for each). The bound catches the usual leaks
(keeping each step's loss with its autograd graph, appending outputs to a list): one kept graph of the test detector
is about 0.3 MB, so 90 of them exceed it, which
:func:`test_the_probe_sees_a_leak_of_this_size` checks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.engine import DETECTORS, detector_config, shapes  # noqa: E402
from support.tiny_detector import TinyShapes  # noqa: E402

from detkit import plugins  # noqa: E402
from detkit.engine.trainer import Trainer  # noqa: E402

BOUND_MB = 10.0
WARMUP, STEPS = 30, 120


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssProbe:
    def __init__(self) -> None:
        self.samples: dict[int, float] = {}

    @plugins.hookimpl
    def detkit_after_step(self, trainer, step, losses):
        self.samples[step] = rss_mb()


def in_fresh_process(test_name: str) -> None:
    """Run one test of this file in a new interpreter: in a long pytest process, memory freed by earlier tests is
    reused, which would hide growth from the RSS probe."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{test_name}"],
                         capture_output=True, text=True, env={**os.environ, "DETKIT_MEMORY_CHILD": "1"}, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


@pytest.mark.parametrize("detector", DETECTORS)
def test_resident_memory_is_flat_over_many_iterations(tmp_path, detector):
    if not os.environ.get("DETKIT_MEMORY_CHILD"):
        return in_fresh_process(f"test_resident_memory_is_flat_over_many_iterations[{detector}]")
    probe = RssProbe()
    pm = plugins.plugin_manager()
    pm.register(probe)
    try:
        # 2 steps per epoch; the real models on half the batch (the engine repeats the same work, in half the time)
        batch = 4 if detector == "tiny" else 2
        trainer = Trainer(detector_config(detector, tmp_path, epochs=STEPS // 2, eval_interval=10, checkpoint_steps=10,
                                          ema=True, log_interval=5, batch_size=batch),
                          datasets=(shapes(detector, 2 * batch), shapes(detector, 4, seed=1, flip=False)))
        trainer.fit()
    finally:
        pm.unregister(probe)
    assert trainer.step == STEPS and len(probe.samples) == STEPS
    after_warmup = max(probe.samples[s] for s in range(WARMUP - 2, WARMUP + 1))
    late = [probe.samples[s] for s in range(STEPS - 10, STEPS + 1)]
    growth = max(late) - after_warmup
    assert growth < BOUND_MB, (f"resident memory grew by {growth:.1f} MB over {STEPS - WARMUP} steps "
                               f"({after_warmup:.1f} -> {max(late):.1f} MB)")


def test_the_probe_sees_a_leak_of_this_size():
    """The measurement can fail: holding one step's graph per iteration, as a leaking loop would, grows resident
    memory past the bound within the same number of iterations."""
    if not os.environ.get("DETKIT_MEMORY_CHILD"):
        return in_fresh_process("test_the_probe_sees_a_leak_of_this_size")
    torch.manual_seed(0)
    from support.tiny_detector import TinyDetector

    model = TinyDetector(num_classes=3)
    ds = TinyShapes(4)
    images = torch.stack([ds[i][0] for i in range(4)])
    mask = torch.zeros(4, 32, 32, dtype=torch.bool)
    kept = []
    start = rss_mb()
    for _ in range(STEPS - WARMUP):
        out = model(images, mask)
        kept.append(out["pred_logits"].sum() + out["pred_boxes"].sum())  # the graph stays alive
    assert rss_mb() - start > BOUND_MB
