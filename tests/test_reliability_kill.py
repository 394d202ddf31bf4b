"""Kill at any moment: a training process SIGKILLed again and again (once deterministically in the middle of writing
a checkpoint, then at random points) and restarted with ``train.resume=auto`` each time ends with exactly the weights
of an uninterrupted run (CPU, deterministic mode), and ``checkpoint_last.pth`` is never a partial file; for the test
detector and for small real DETR and LW-DETR models (their larger checkpoints take longer to write, so more kills
land inside a write).

Run as a script (``python tests/test_reliability_kill.py RUN_PARENT DETECTOR``) this file is the training process
itself: it prints ``step N`` after every optimizer step, and with ``DETKIT_TEST_KILL_IN_SAVE=K`` it writes half of its
K-th checkpoint to disk and then SIGKILLs itself.
"""

from __future__ import annotations

import io
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.engine import DETECTORS, REPO, TESTS, assert_same_state, detector_config, shapes  # noqa: E402

from detkit import plugins  # noqa: E402
from detkit.engine.callbacks.logger import read_metrics  # noqa: E402
from detkit.weights.io import load_checkpoint_file  # noqa: E402
from detkit.engine.trainer import train  # noqa: E402

TOTAL_STEPS = 12  # 3 epochs of 4 steps
RANDOM_KILLS = {"tiny": 3, "detr": 1, "lwdetr": 1}  # each costs a process start; the real models get one


def config(parent: Path, detector: str, **extra):
    # a checkpoint after every step, so that kills land during writes too; EMA and a warm-up + cosine schedule so
    # that every piece of state (EMA weights, Adam moments, scheduler, RNG) has to survive the restarts
    return detector_config(detector, parent, name="run", epochs=3, checkpoint_steps=1, eval_interval=-1, ema=True,
                           ema_tau=5, warmup_iters=3, lr_schedule="cosine", **extra)


def datasets(detector: str):
    return shapes(detector, 16, seed=0), shapes(detector, 4, seed=1, flip=False)


# ---------------------------------------------------------------------------------------------------------------------
# the training process
# ---------------------------------------------------------------------------------------------------------------------


class Progress:
    @plugins.hookimpl
    def detkit_after_step(self, trainer, step, losses):
        print(f"step {step}", flush=True)


def _kill_while_saving(at: int) -> None:
    """Make the ``at``-th ``torch.save`` write half its bytes to the file, sync them, and SIGKILL this process."""
    real_save = torch.save
    calls = [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] != at:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        print("killing myself while saving", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save


def worker(parent: Path, detector: str) -> None:
    at = int(os.environ.get("DETKIT_TEST_KILL_IN_SAVE", "0"))
    if at:
        _kill_while_saving(at)
    plugins.plugin_manager().register(Progress())
    train(config(parent, detector, resume="auto"), datasets=datasets(detector))
    print("done", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# the test
# ---------------------------------------------------------------------------------------------------------------------


class Run:
    """One training process whose output lines arrive on a queue."""

    def __init__(self, parent: Path, detector: str, **env: str) -> None:
        full_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        full_env.update(PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]),
                        OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)
        self.proc = subprocess.Popen([sys.executable, __file__, str(parent), detector], env=full_env, cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.log.append(line)
            self.lines.put(line.strip())
        self.lines.put(None)

    def wait_for_step(self, step: int, timeout: float = 120) -> bool:
        """Block until the process printed ``step N`` with N >= ``step``; False if it ended first."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            if line is None:
                return False
            if line.startswith("step ") and int(line.split()[1]) >= step:
                return True

    def kill(self) -> int:
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(timeout=60)

    def finish(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def output(self) -> str:
        return "".join(self.log)[-3000:]


def _checkpoint_step(last: Path) -> int:
    """The step of ``checkpoint_last.pth`` (0 if there is none yet); loading it proves it is complete."""
    return int(load_checkpoint_file(last)["step"]) if last.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("detector", DETECTORS)
def test_sigkill_at_random_moments_then_resume_auto_equals_an_uninterrupted_run(tmp_path, detector):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    why = f"(random seed {seed})"

    ref_dir = tmp_path / "reference"
    train(config(ref_dir, detector), datasets=datasets(detector))
    ref = load_checkpoint_file(ref_dir / "run" / "checkpoint_last.pth")
    assert ref["step"] == TOTAL_STEPS

    parent = tmp_path / "killed"
    run_dir = parent / "run"
    last = run_dir / "checkpoint_last.pth"

    # 1. killed in the middle of writing its 3rd checkpoint (after step 3): half a file is on disk, under a
    #    temporary name; checkpoint_last.pth is still the complete one of step 2
    first = Run(parent, detector, DETKIT_TEST_KILL_IN_SAVE="3")
    assert first.finish() == -signal.SIGKILL, first.output()
    assert "killing myself while saving" in first.output()
    partial = [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < last.stat().st_size
    assert _checkpoint_step(last) == 2

    # 2. killed at random moments: after a random step, after a random delay (often inside the next save)
    done = _checkpoint_step(last)
    kills = 0
    for _ in range(RANDOM_KILLS[detector]):
        target = rng.randint(done + 1, TOTAL_STEPS - 2)  # a step or more before the end: the kill lands
        run = Run(parent, detector)
        if not run.wait_for_step(target):
            pytest.fail(f"the run ended before step {target} {why}:\n{run.output()}")
        time.sleep(rng.uniform(0.0, 0.25))
        code = run.kill()
        kills += code == -signal.SIGKILL
        step = _checkpoint_step(last)  # never partial: it always loads
        assert step >= done, why
        # each restart removes the leftover of an interrupted write, a kill leaves at most one new one
        assert len([p for p in run_dir.iterdir() if p.name.endswith(".tmp")]) <= 1, why
        done = step
        if done >= TOTAL_STEPS - 2:
            break
    assert kills >= 1, why
    assert not partial[0].exists()  # the restart removed the interrupted write's leftover

    # 3. the last restart runs to the end (in this process: one interpreter start less)
    train(config(parent, detector, resume="auto"), datasets=datasets(detector))
    out = load_checkpoint_file(last)
    assert out["step"] == ref["step"] == TOTAL_STEPS and out["epoch"] == ref["epoch"] == 3
    assert_same_state(ref["model"], out["model"])
    assert_same_state(ref["ema"]["module"], out["ema"]["module"])
    for a, b in zip(ref["optimizer"]["state"].values(), out["optimizer"]["state"].values(), strict=True):
        assert_same_state(a, b)
    assert out["scheduler"] == ref["scheduler"]
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    # every line of metrics.jsonl that a kill did not cut is a whole record, and the restarts' records are there
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows and rows[-1]["type"] == "epoch" and rows[-1]["finished_epoch"] == 2
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert sum(1 for line in lines if not _is_json(line)) <= kills + 1, why


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
