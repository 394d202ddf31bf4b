"""Two gloo processes on CPU train like one process on the same global batch (the test detector and small real DETR /
LW-DETR models, LW-DETR's BatchNorm synchronised); a failing rank stops the other."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import ddp_worker  # noqa: E402
from support.engine import DETECTORS, REPO, TESTS, assert_same_state, detector_config  # noqa: E402

from detkit.engine import distributed as du  # noqa: E402
from detkit.weights.io import load_checkpoint_file  # noqa: E402
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


# measured (3 steps, lr 1e-3): tiny 2e-7, DETR 1e-6, LW-DETR 2.1e-5 (one element of a projector conv: the synchronised
# batch norm's E[x^2] - E[x]^2 variance rounds otherwise than batch norm's); LW-DETR without runtime.sync_bn: 6e-3,
# 104k elements over 1e-5
DDP_ATOL = {"tiny": 1e-5, "detr": 1e-5, "lwdetr": 1e-4}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """One torchrun of 2 gloo ranks that trains every detector of ``DETECTORS`` in turn (one process start for all);
    returns the output folder (``DETECTOR/run/checkpoint_last.pth``, ``DETECTOR/metrics.json``)."""
    out = tmp_path_factory.mktemp("ddp")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
         str(out), "train", *DETECTORS],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("detector", DETECTORS)
def test_two_gloo_ranks_match_one_process_including_an_empty_batch(ddp_runs, tmp_path, detector):
    single_dir = tmp_path / "single"
    single = train(ddp_worker.config(single_dir, batch_size=4, detector=detector),
                   datasets=ddp_worker.datasets(detector))
    ds, _ = ddp_worker.datasets(detector)
    assert all(len(ds.annotations[i]) == 0 for i in ddp_worker.empty_indices())  # rank 1's first batch: no objects

    a = load_checkpoint_file(ddp_runs / detector / "run" / "checkpoint_last.pth")
    b = load_checkpoint_file(single_dir / "run" / "checkpoint_last.pth")
    assert a["step"] == b["step"] == 3 and a["world_size"] == 2
    # gradients are averaged in another order than one process sums them: equal up to float rounding
    assert_same_state(a["model"], b["model"], atol=DDP_ATOL[detector])
    ddp_metrics = json.loads((ddp_runs / detector / "metrics.json").read_text())
    assert ddp_metrics.keys() == single.keys()
    assert ddp_metrics["AR100"] == pytest.approx(single["AR100"], abs=0.02)  # evaluation gathered from both ranks


def test_sync_batchnorm_conversion_keeps_the_tensors_and_without_a_group_is_batchnorm(tmp_path):
    """``runtime.sync_bn``: LW-DETR's projector BatchNorms become synchronised ones in place (same parameter and
    buffer tensors, so the optimizer, EMA and callbacks built before still hold them; same state-dict keys), and
    outside a process group they compute what BatchNorm computes."""
    from detkit.models.build import build_model

    model = build_model(detector_config("lwdetr", tmp_path, ["model.num_classes=3"]).model)
    reference = build_model(detector_config("lwdetr", tmp_path, ["model.num_classes=3"]).model)
    reference.load_state_dict(model.state_dict())
    tensors = {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()}
    batch_norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batch_norms  # the projector's C2f blocks
    assert du.convert_sync_batchnorm(model, torch.device("cpu")) is model
    assert all(isinstance(model.get_submodule(n), du.CPUSyncBatchNorm) for n in batch_norms)
    assert {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()} == tensors
    images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    model.train()
    reference.train()
    torch.manual_seed(0)
    out = model(images, mask)
    torch.manual_seed(0)
    ref = reference(images, mask)
    torch.testing.assert_close(out["pred_logits"], ref["pred_logits"], rtol=0, atol=0)
    assert_same_state(model.state_dict(), reference.state_dict())  # running statistics updated alike


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
