"""``train.resume=auto`` is decided on rank 0 and broadcast: ranks never start from different states."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.engine import REPO, TESTS, tiny_config  # noqa: E402
from support.tiny_detector import TinyShapes  # noqa: E402

from detkit.engine import distributed as du  # noqa: E402
from detkit.engine import setup as engine_setup  # noqa: E402
from detkit.engine import trainer as trainer_module  # noqa: E402
from detkit.errors import CheckpointError  # noqa: E402


def rank_one(tmp_path: Path, monkeypatch, rank0_sends: str | None, seen_by_rank: list[bool] | None = None):
    """``Trainer._resume_path`` as rank 1 of 2 runs it, rank 0's broadcast answer being ``rank0_sends``."""
    cfg = tiny_config(tmp_path, ["train.resume=auto"])
    sent: list[object] = []

    def broadcast_object(obj, src=0):
        sent.append(obj)
        return rank0_sends

    monkeypatch.setattr(du, "broadcast_object", broadcast_object)
    monkeypatch.setattr(du, "all_gather_object", lambda obj: list(seen_by_rank or [True, obj]))
    fake = SimpleNamespace(cfg=cfg, run_dir=tmp_path / "run", is_main=False, rank=1)
    return trainer_module.Trainer._resume_path(fake), sent


def test_rank_one_with_a_stale_view_resumes_from_rank_zeros_checkpoint(tmp_path, monkeypatch):
    ckpt = tmp_path / "run" / "checkpoint_last.pth"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"written by rank 0")
    monkeypatch.setattr(engine_setup, "find_last_checkpoint", lambda run_dir: None)  # rank 1 does not see it yet
    path, sent = rank_one(tmp_path, monkeypatch, rank0_sends=str(ckpt))
    assert path == ckpt
    assert sent == [None]  # rank 1 did not decide


def test_rank_one_does_not_resume_when_rank_zero_starts_from_scratch(tmp_path, monkeypatch):
    stale = tmp_path / "run" / "checkpoint_last.pth"  # e.g. a file rank 0 already removed
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")
    path, _ = rank_one(tmp_path, monkeypatch, rank0_sends=None)
    assert path is None


def test_a_rank_that_cannot_see_rank_zeros_checkpoint_stops_every_rank(tmp_path, monkeypatch):
    ckpt = tmp_path / "run" / "checkpoint_last.pth"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"rank\(s\) 1 cannot see that file; runtime.output_dir must be on a "
                                              r"file system every node shares"):
        rank_one(tmp_path, monkeypatch, rank0_sends=str(ckpt), seen_by_rank=[True, False])


@pytest.mark.slow
def test_two_gloo_ranks_resume_from_the_same_state(tmp_path):
    """A real 2-process run: rank 1 does not see checkpoint_last.pth, it still continues from it like rank 0."""
    first = trainer_module.train(tiny_config(tmp_path, epochs=2, max_steps=3), datasets=(TinyShapes(16), None))
    assert first == {}  # no validation set
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, str(TESTS / "support" / "resume_worker.py"), str(tmp_path),
                                       str(tmp_path / f"rank{rank}.json")], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    states = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert states[0] == states[1]
    assert states[0]["step"] == 3  # where the first run stopped
