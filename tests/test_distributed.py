"""Two gloo processes on CPU train like one process on the same global batch; a failing rank stops the other."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import ddp_worker  # noqa: E402
from support.engine import REPO, TESTS, assert_same_state  # noqa: E402

from detkit.engine.checkpoint import load_checkpoint_file  # noqa: E402
from detkit.engine.trainer import train  # noqa: E402

WORKER = TESTS / "support" / "ddp_worker.py"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_including_an_empty_batch(tmp_path):
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
         str(ddp_dir), "train"],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    single_dir = tmp_path / "single"
    single = train(ddp_worker.config(single_dir, batch_size=4), datasets=ddp_worker.datasets())
    ds, _ = ddp_worker.datasets()
    assert all(len(ds.annotations[i]) == 0 for i in ddp_worker.empty_indices())  # rank 1's first batch: no objects

    a = load_checkpoint_file(ddp_dir / "run" / "checkpoint_last.pth")
    b = load_checkpoint_file(single_dir / "run" / "checkpoint_last.pth")
    assert a["step"] == b["step"] == 3 and a["world_size"] == 2
    # gradients are averaged in another order than one process sums them: equal up to float rounding
    assert_same_state(a["model"], b["model"], atol=1e-5)
    ddp_metrics = json.loads((ddp_dir / "metrics.json").read_text())
    assert ddp_metrics.keys() == single.keys()
    assert ddp_metrics["AR100"] == pytest.approx(single["AR100"], abs=0.02)  # evaluation gathered from both ranks


@pytest.mark.slow
def test_a_failing_rank_makes_the_other_exit_in_bounded_time(tmp_path):
    port = str(_free_port())
    procs = []
    t0 = time.monotonic()
    for rank in range(2):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   TEST_TIMEOUT_S="20")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), "raise"], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=150)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    elapsed = time.monotonic() - t0
    assert procs[1].returncode != 0 and "rank 1 fails on purpose" in outs[1]
    assert procs[0].returncode != 0, outs[0][-2000:]
    assert elapsed < 120
