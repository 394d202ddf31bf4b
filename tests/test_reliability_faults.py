"""Faults during training: non-finite gradients and model outputs, a full disk, a corrupt checkpoint to resume,
uneven data shards. The divergence tests run on the test detector and on small real DETR and LW-DETR models.

What ``tests/test_engine_train.py`` already proves (non-finite *losses* are skipped; divergence stops with the last
good checkpoint kept; unwritable output directory and missing data root fail before any step) is not repeated here.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.engine import CLASS_HEAD, DETECTORS, REPO, TESTS, detector_config, shapes, tiny_config  # noqa: E402
from support.tiny_detector import TinyShapes  # noqa: E402

from detkit import plugins  # noqa: E402
from detkit.engine.callbacks import logger as logger_callback  # noqa: E402
from detkit.weights.io import load_checkpoint_file  # noqa: E402
from detkit.engine.sampling import EpochBatchSampler  # noqa: E402
from detkit.engine.trainer import DivergenceError, RunLogHandler, Trainer  # noqa: E402
from detkit.errors import CheckpointError, DetkitError, OutputError  # noqa: E402


def datasets(n=16):
    return TinyShapes(n), TinyShapes(6, seed=1, flip=False)


class Snapshots:
    """Keeps a copy of the weights and of the logged loss after every optimizer step."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.losses: dict[int, float] = {}
        self.ok: dict[int, bool] = {}

    @plugins.hookimpl
    def detkit_after_step(self, trainer, step, losses):
        self.weights[step] = {k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()}
        if trainer.ema is not None:
            self.weights[step].update({f"ema.{k}": v.clone() for k, v in trainer.ema.module.state_dict().items()})
        self.losses[step] = losses["loss"]
        self.ok[step] = trainer.last_step_ok


@pytest.fixture
def snapshots():
    snap = Snapshots()
    plugins.plugin_manager().register(snap)
    yield snap
    plugins.plugin_manager().unregister(snap)


def poison_gradients(trainer: Trainer, bad: dict[int, float], detector: str = "tiny") -> None:
    """Multiply the class head's gradient by ``bad[n]`` (nan or inf) during optimizer step ``n`` (1-based): the
    loss stays finite, only the gradient is not."""
    weight = trainer.unwrapped_model.get_parameter(CLASS_HEAD[detector])
    weight.register_hook(lambda g: g * bad[trainer.step + 1] if trainer.step + 1 in bad else g)


def poison_backbone(trainer: Trainer, steps: set[int]) -> None:
    """Make the backbone's feature maps NaN in the training forward passes of optimizer steps ``steps`` (1-based):
    everything after it (transformer, two-stage proposals, heads, matcher, loss) sees the NaN, as in a diverged
    step."""
    def hook(module, args, output):
        if module.training and trainer.step + 1 in steps:
            return [o * float("nan") for o in output] if isinstance(output, list) else output * float("nan")
        return None

    trainer.unwrapped_model.backbone.register_forward_hook(hook)


@pytest.mark.parametrize("detector", DETECTORS)
def test_non_finite_gradients_with_finite_loss_are_skipped_and_logged(tmp_path, snapshots, caplog, detector):
    trainer = Trainer(detector_config(detector, tmp_path, epochs=2, max_bad_steps=3, eval_interval=-1,
                                      clip_max_norm=0.0, ema=True, ema_decay=0.5),
                      datasets=(shapes(detector, 16), None))
    head = CLASS_HEAD[detector]
    poison_gradients(trainer, {3: float("nan"), 4: float("inf")}, detector)
    caplog.set_level("WARNING", logger="detkit.train")
    initial = {k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()}
    trainer.fit()
    assert trainer.step == 8 and trainer.bad_steps == 0
    assert [s for s, ok in snapshots.ok.items() if not ok] == [3, 4]
    assert all(torch.isfinite(torch.tensor(v)) for v in snapshots.losses.values())  # the losses were finite
    # a skipped step changes no weight at all (EMA included); the steps around it do
    for step in (3, 4):
        for k, v in snapshots.weights[step].items():
            assert torch.equal(v, snapshots.weights[step - 1][k]), (step, k)
    assert not torch.equal(snapshots.weights[2][head], initial[head])
    for key in (head, f"ema.{head}"):
        assert not torch.equal(snapshots.weights[5][key], snapshots.weights[4][key])
    assert all(torch.isfinite(v).all() for v in trainer.unwrapped_model.state_dict().values() if v.is_floating_point())
    # the optimizer took 6 steps, not 8 (Adam's step counters did not advance on the skipped ones)
    assert {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()} == {6}
    messages = [r.getMessage() for r in caplog.records]
    assert sum("non-finite gradient, step skipped" in m for m in messages) == 2, messages
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    bad_rows = [r for r in rows if r["type"] == "bad_step"]
    assert [r["step"] for r in bad_rows] == [3, 4] and all(r["grad_norm"] != r["grad_norm"] or r["grad_norm"] ==
                                                           float("inf") for r in bad_rows)


@pytest.mark.parametrize("detector", DETECTORS)
def test_consecutive_non_finite_gradients_stop_training_keeping_the_last_good_checkpoint(tmp_path, snapshots,
                                                                                       detector):
    trainer = Trainer(detector_config(detector, tmp_path, epochs=3, max_bad_steps=3, eval_interval=-1,
                                      checkpoint_steps=1),
                      datasets=(shapes(detector, 32), None))  # 8 steps per epoch: no epoch-end checkpoint in between
    poison_gradients(trainer, {s: float("nan") for s in range(3, 100)}, detector)
    with pytest.raises(DivergenceError, match=r"3 consecutive steps .*train.max_bad_steps=3") as err:
        trainer.fit()
    assert str(tmp_path / "run" / "checkpoint_last.pth") in str(err.value)
    assert max(snapshots.weights) == 5  # stopped at the third bad step
    ckpt = load_checkpoint_file(tmp_path / "run" / "checkpoint_last.pth")
    assert ckpt["step"] == 2 and ckpt["bad_steps"] == 0
    for k, v in ckpt["model"].items():
        assert torch.equal(v, snapshots.weights[2][k]), k


@pytest.mark.parametrize("detector", DETECTORS)
def test_non_finite_model_outputs_are_skipped_and_counted_then_stop_training(tmp_path, snapshots, caplog, detector):
    """NaN features inside DETR / LW-DETR reach the Hungarian matcher (scipy raised "matrix contains invalid numeric
    entries" there): such a step is skipped and counted like any other bad step, training goes on after two of them,
    and ``train.max_bad_steps`` consecutive ones stop it with the last good checkpoint kept."""
    trainer = Trainer(detector_config(detector, tmp_path, epochs=3, max_bad_steps=3, eval_interval=-1,
                                      checkpoint_steps=1, ema=True), datasets=(shapes(detector, 16), None))
    poison_backbone(trainer, {2, 3, *range(5, 100)})
    caplog.set_level("WARNING", logger="detkit.train")
    with pytest.raises(DivergenceError, match=r"3 consecutive steps .*train.max_bad_steps=3"):
        trainer.fit()
    assert trainer.step == 7 and max(snapshots.weights) == 7
    assert [s for s, ok in snapshots.ok.items() if not ok] == [2, 3, 5, 6, 7]
    assert all(not math.isfinite(snapshots.losses[s]) for s in (2, 3, 5, 6, 7))
    assert all(math.isfinite(snapshots.losses[s]) for s in (1, 4))
    for step in (2, 3, 5):  # a skipped step changes no weight (EMA included); step 4 trained again
        for k, v in snapshots.weights[step].items():
            assert torch.equal(v, snapshots.weights[step - 1][k]), (step, k)
    head = CLASS_HEAD[detector]
    assert not torch.equal(snapshots.weights[4][head], snapshots.weights[3][head])
    assert sum("non-finite loss, step skipped" in r.getMessage() for r in caplog.records) == 5
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "bad_step"] == [2, 3, 5, 6, 7]
    ckpt = load_checkpoint_file(tmp_path / "run" / "checkpoint_last.pth")
    assert ckpt["step"] == 4 and ckpt["bad_steps"] == 0
    for k, v in ckpt["model"].items():
        assert torch.equal(v, snapshots.weights[4][k]), k
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_disk_full_while_checkpointing_stops_with_a_clear_error_and_keeps_the_previous_one(tmp_path, monkeypatch,
                                                                                           snapshots):
    real_save = torch.save
    calls = []

    def filling_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < 3:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"\0" * 1000)  # part of the file made it to disk, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    trainer = Trainer(tiny_config(tmp_path, epochs=2, eval_interval=-1, checkpoint_steps=1), datasets=datasets())
    monkeypatch.setattr(torch, "save", filling_save)
    last = tmp_path / "run" / "checkpoint_last.pth"
    with pytest.raises(CheckpointError) as err:
        trainer.fit()
    monkeypatch.setattr(torch, "save", real_save)
    assert isinstance(err.value, DetkitError)  # the CLI prints it as one message and exits 2
    assert f"cannot write checkpoint {last}: No space left on device" in str(err.value)
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    assert max(snapshots.weights) == 3  # training stopped at the failed write, no step after it
    ckpt = load_checkpoint_file(last)
    assert ckpt["step"] == 2
    assert sorted(p.name for p in last.parent.iterdir() if p.name.startswith(".")) == []  # no partial temp file


DEV_FULL = Path("/dev/full")  # Linux: every write fails with ENOSPC, as on a full disk


class FillingFile:
    """A text file on a disk that fills up: the first ``room`` writes go through, the next one writes part of its
    text and fails with ENOSPC."""

    def __init__(self, path, room: int) -> None:
        self.file, self.room = open(path, "a", encoding="utf-8"), room

    def write(self, text: str) -> int:
        if self.room <= 0:
            self.file.write(text[: len(text) // 2])
            self.file.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= 1
        return self.file.write(text)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@pytest.mark.parametrize("disk", ["patched", "dev_full"])
def test_disk_full_while_logging_metrics_stops_with_a_clear_error_and_keeps_the_last_checkpoint(
        tmp_path, monkeypatch, snapshots, disk):
    run = tmp_path / "run"
    metrics, last = run / "metrics.jsonl", run / "checkpoint_last.pth"
    if disk == "dev_full":
        if not DEV_FULL.exists():
            pytest.skip("no /dev/full on this system")
        run.mkdir()
        metrics.symlink_to(DEV_FULL)  # every flush of metrics.jsonl fails with a real ENOSPC
    else:
        monkeypatch.setattr(logger_callback, "open", lambda path, *a, **k: FillingFile(path, room=0), raising=False)
    # a record every 2 steps, a checkpoint every step: the record of step 2 fails before step 2's checkpoint
    trainer = Trainer(tiny_config(tmp_path, epochs=2, eval_interval=-1, checkpoint_steps=1, log_interval=2),
                      datasets=datasets())
    with pytest.raises(OutputError) as err:
        trainer.fit()
    assert isinstance(err.value, DetkitError)  # the CLI prints it as one message and exits 2
    message = str(err.value)
    assert f"cannot write metrics {metrics}: No space left on device (disk full)" in message
    assert f"the last good checkpoint {last} is intact" in message and "train.resume=auto" in message
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    assert trainer.step == 2 and max(snapshots.weights) == 1  # stopped in step 2's hooks, no step after it
    assert load_checkpoint_file(last)["step"] == 1
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no partial temp file
    if disk == "patched":  # space freed: the run continues from the kept checkpoint, past the cut record
        monkeypatch.undo()
        resumed = Trainer(tiny_config(tmp_path, epochs=2, eval_interval=-1, checkpoint_steps=1, log_interval=2,
                                      resume="auto"), datasets=datasets())
        assert resumed.step == 1
        resumed.fit()
        assert load_checkpoint_file(last)["step"] == 8
        steps = [r["step"] for r in logger_callback.read_metrics(metrics) if r["type"] == "train"]
        assert steps == [2, 4, 6, 8]


@pytest.mark.skipif(not DEV_FULL.exists(), reason="no /dev/full on this system")
def test_cli_train_disk_full_on_metrics_is_one_message_not_a_traceback(tmp_path, run_cli):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(DEV_FULL)
    transforms = {"type": "lwdetr_val", "size": 64}
    config = tmp_path / "cfg.yaml"
    config.write_text(json.dumps({
        "model": {"type": "tiny_test"},
        "data": {"format": "synthetic", "root": None, "num_workers": 0, "train_transforms": transforms,
                 "val_transforms": transforms,
                 "synthetic": {"image_size": 64, "num_train": 8, "num_val": 2, "max_objects": 2}},
        "train": {"epochs": 1, "batch_size": 2, "checkpoint_steps": 1, "log_interval": 2, "eval_interval": -1},
        "runtime": {"output_dir": str(run), "device": "cpu", "progress": "log", "threads": 1,
                    "tensorboard": False, "plot": False},
        "plugins": {"imports": ["support.tiny_detector"]},
    }))
    out = run_cli("train", str(config), env={"PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])})
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert (f"detkit train: error: cannot write metrics {run / 'metrics.jsonl'}: No space left on device "
            "(disk full)") in out.stderr
    assert f"the last good checkpoint {run / 'checkpoint_last.pth'} is intact" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert load_checkpoint_file(run / "checkpoint_last.pth")["step"] == 1


def test_full_disk_under_train_log_is_one_stderr_line_not_a_traceback_per_record(tmp_path, capsys):
    """``train.log`` on a full disk: the first failed record prints one line naming the file and the cause, later
    records are dropped quietly (logging's default handler prints a traceback for each)."""
    import logging

    handler = RunLogHandler(tmp_path / "train.log", encoding="utf-8")

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    handler.stream = FullDisk()
    logger = logging.getLogger("detkit.test_full_disk")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for i in range(3):
            logger.warning("record %d", i)
    finally:
        logger.removeHandler(handler)
        handler.stream = None
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    assert err.count("\n") == 1 and "train.log" in err and "No space left on device" in err


def test_corrupt_checkpoint_last_is_an_error_before_any_step_not_a_silent_restart(tmp_path, snapshots):
    Trainer(tiny_config(tmp_path, epochs=1, max_steps=2, eval_interval=-1), datasets=datasets()).fit()
    last = tmp_path / "run" / "checkpoint_last.pth"
    data = last.read_bytes()
    snapshots.weights.clear()
    last.write_bytes(data[: len(data) // 3])  # e.g. copied by hand from a full disk
    with pytest.raises(CheckpointError, match="truncated or not a torch file") as err:
        Trainer(tiny_config(tmp_path, epochs=2, resume="auto", eval_interval=-1), datasets=datasets())
    assert str(last) in str(err.value)
    assert snapshots.weights == {} and last.read_bytes() == data[: len(data) // 3]  # nothing overwritten


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 70), batch=st.integers(1, 6), world=st.integers(1, 4), epoch=st.integers(0, 3),
       start=st.integers(0, 5))
def test_every_rank_gets_the_same_number_of_non_empty_batches(n, batch, world, epoch, start):
    """DDP needs the same number of optimizer steps on every rank, or a collective waits forever: however the data
    set size divides, the sampler (with the trainer's ``drop_last`` rule) gives each rank equally many batches,
    none of them empty, and a resumed epoch skips the same number everywhere."""
    drop_last = n >= batch * world  # the trainer's rule
    per_rank = []
    for rank in range(world):
        s = EpochBatchSampler(n, batch, seed=3, rank=rank, world_size=world, drop_last=drop_last)
        s.set_epoch(epoch, start_batch=min(start, s.num_batches()))
        per_rank.append([[i for i, _ in b] for b in s])
        assert len(per_rank[-1]) == len(s)
    full = EpochBatchSampler(n, batch, seed=3, world_size=world, drop_last=drop_last).num_batches()
    assert full >= 1  # never an epoch without a step
    assert [len(b) for b in per_rank] == [full - min(start, full)] * world
    assert all(1 <= len(b) <= batch for batches in per_rank for b in batches)
    assert all(0 <= i < n for batches in per_rank for b in batches for i in b)
    if start == 0 and not drop_last:  # every sample is seen at least once
        assert {i for batches in per_rank for b in batches for i in b} == set(range(n))
