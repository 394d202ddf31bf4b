"""Distributed faults, two gloo processes on CPU (``tests/test_distributed.py`` covers a rank that *raises* and a
rank whose first batch has no objects):

- a rank that is SIGKILLed (no exception, no goodbye) makes the survivor exit with an error within a bounded time;
- a rank that has no objects in any of its training batches, a data set whose size is not a multiple of the global
  batch, and an evaluation shard that is empty on one rank run to the end without deadlock, with the same metrics
  on both ranks.

Run as a script (``python tests/test_reliability_distributed.py OUT MODE`` with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT`` set) this file is one rank.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.engine import REPO, TESTS, tiny_config  # noqa: E402
from support.tiny_detector import TinyShapes  # noqa: E402

from detkit import plugins  # noqa: E402
from detkit.engine.sampling import EpochBatchSampler  # noqa: E402

N_TRAIN, BATCH, EPOCHS, SEED = 10, 2, 2, 5  # 10 samples, global batch 4: 2 steps per epoch, 2 samples left over


def rank1_indices() -> list[int]:
    """Every sample rank 1 trains on, in every epoch."""
    out = []
    for epoch in range(EPOCHS):
        s = EpochBatchSampler(N_TRAIN, BATCH, seed=SEED, rank=1, world_size=2, drop_last=True)
        s.set_epoch(epoch)
        out += [i for b in s for i, _ in b]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# one rank
# ---------------------------------------------------------------------------------------------------------------------


class DieOnRank1:
    @plugins.hookimpl
    def detkit_after_step(self, trainer, step, losses):
        if trainer.rank == 1 and step == 2:
            print("rank 1 dies", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def worker(out: Path, mode: str) -> None:
    from detkit.engine.trainer import train

    rank = int(os.environ["RANK"])
    if mode == "die":
        plugins.plugin_manager().register(DieOnRank1())
        datasets = TinyShapes(16), TinyShapes(4, seed=1, flip=False)
        cfg = tiny_config(out, ["runtime.dist_timeout_s=20"], epochs=2, batch_size=2, eval_interval=-1)
    else:
        # one validation image: rank 1's evaluation shard is empty
        datasets = TinyShapes(N_TRAIN, empty=rank1_indices()), TinyShapes(1, seed=1, flip=False)
        cfg = tiny_config(out, ["runtime.dist_timeout_s=30", "model.dropout=0.0"], epochs=EPOCHS, batch_size=BATCH,
                          seed=SEED, eval_interval=1)
    metrics = train(cfg, datasets=datasets)
    (out / f"metrics_rank{rank}.json").write_text(json.dumps(metrics))


# ---------------------------------------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, mode: str, timeout: float) -> tuple[list[subprocess.Popen], list[str], float]:
    port = str(_free_port())
    procs = []
    t0 = time.monotonic()
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, __file__, str(out), mode], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:  # a hang: fail the test, never the suite
                p.kill()
    return procs, outs, time.monotonic() - t0


@pytest.mark.slow
def test_a_killed_rank_makes_the_survivor_exit_in_bounded_time(tmp_path):
    procs, outs, elapsed = _launch(tmp_path, "die", timeout=150)
    assert procs[1].returncode == -signal.SIGKILL and "rank 1 dies" in outs[1], outs[1][-2000:]
    assert procs[0].returncode not in (0, None), outs[0][-2000:]
    assert elapsed < 120  # process-group timeout 20 s, plus start-up on a busy machine
    assert not (tmp_path / "metrics_rank0.json").exists()


@pytest.mark.slow
def test_empty_batches_uneven_data_and_an_empty_eval_shard_do_not_deadlock(tmp_path):
    ds = TinyShapes(N_TRAIN, empty=rank1_indices())
    assert N_TRAIN % (2 * BATCH) != 0 and all(not ds.annotations[i] for i in rank1_indices())
    assert any(ds.annotations[i] for i in range(N_TRAIN))  # rank 0 does see objects
    procs, outs, elapsed = _launch(tmp_path, "uneven", timeout=200)
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"rank {rank}:\n{outs[rank][-3000:]}"
    m0 = json.loads((tmp_path / "metrics_rank0.json").read_text())
    m1 = json.loads((tmp_path / "metrics_rank1.json").read_text())
    assert m0.keys() >= {"AP", "AR100"} and {k: v for k, v in m0.items() if k != "eval_time_s"} == \
        {k: v for k, v in m1.items() if k != "eval_time_s"}
    from detkit.weights.io import load_checkpoint_file

    ckpt = load_checkpoint_file(tmp_path / "run" / "checkpoint_last.pth")
    assert ckpt["step"] == EPOCHS * (N_TRAIN // (2 * BATCH)) and ckpt["world_size"] == 2


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
