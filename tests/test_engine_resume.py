"""Exact resume: a run stopped mid-epoch and resumed ends with the same weights as an uninterrupted one (the test
detector and small real DETR / LW-DETR models)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.engine import CLASS_HEAD, DETECTORS, assert_same_state, detector_config, shapes, tiny_config  # noqa: E402
from support.tiny_detector import TinyShapes  # noqa: E402

from detkit import plugins  # noqa: E402
from detkit.weights.io import load_checkpoint_file  # noqa: E402
from detkit.engine.trainer import Trainer, train  # noqa: E402
from detkit.errors import CheckpointError  # noqa: E402


def datasets(classes=("red", "green", "blue")):
    return TinyShapes(16, seed=0, classes=classes), TinyShapes(6, seed=1, flip=False, classes=classes)


class Crash(Exception):
    pass


class CrashAt:
    """Raises right after optimizer step ``at`` (after the checkpoint callback had its turn)."""

    def __init__(self, at: int) -> None:
        self.at = at

    @plugins.hookimpl
    def detkit_after_step(self, trainer, step, losses):
        if step == self.at:
            raise Crash(f"simulated crash after step {step}")


@pytest.mark.parametrize("detector", DETECTORS)
def test_resume_mid_epoch_is_bit_exact(tmp_path, detector):
    # random streams in every model: dropout (tiny, DETR's transformer), drop path (LW-DETR's ViT)
    common = dict(epochs=2, ema=True, ema_tau=5, checkpoint_steps=3, warmup_iters=3, lr_schedule="cosine")

    def data():
        return shapes(detector, 16, seed=0), shapes(detector, 6, seed=1, flip=False)

    ref_metrics = train(detector_config(detector, tmp_path, name="ref", **common), datasets=data())
    ref = load_checkpoint_file(tmp_path / "ref" / "checkpoint_last.pth")
    assert ref["step"] == 8 and ref["epoch"] == 2

    pm = plugins.plugin_manager()
    crasher = CrashAt(7)  # checkpoints at steps 3, 4 (epoch end) and 6; step 7 is lost
    pm.register(crasher)
    try:
        with pytest.raises(Crash):
            train(detector_config(detector, tmp_path, name="cut", **common), datasets=data())
    finally:
        pm.unregister(crasher)
    mid = load_checkpoint_file(tmp_path / "cut" / "checkpoint_last.pth")
    assert (mid["epoch"], mid["batch_in_epoch"], mid["step"]) == (1, 2, 6)  # resumes inside epoch 1

    trainer = Trainer(detector_config(detector, tmp_path, name="cut", resume="auto", **common), datasets=data())
    assert (trainer.epoch, trainer.batch_in_epoch, trainer.step) == (1, 2, 6)
    metrics = trainer.fit()
    out = load_checkpoint_file(tmp_path / "cut" / "checkpoint_last.pth")
    assert_same_state(ref["model"], out["model"])
    assert_same_state(ref["ema"]["module"], out["ema"]["module"])
    for a, b in zip(ref["optimizer"]["state"].values(), out["optimizer"]["state"].values(), strict=True):
        assert_same_state(a, b)
    assert out["scheduler"]["last_epoch"] == ref["scheduler"]["last_epoch"] == 8
    assert metrics == {**ref_metrics, "eval_time_s": metrics["eval_time_s"]}
    # the run really was interrupted: weights at step 6 differ from the final ones
    head = CLASS_HEAD[detector]
    assert not torch.equal(mid["model"][head], out["model"][head])


def test_resume_refuses_other_classes_and_architecture(tmp_path):
    train(tiny_config(tmp_path, name="a", epochs=1, max_steps=1), datasets=datasets())
    ckpt = tmp_path / "a" / "checkpoint_last.pth"
    with pytest.raises(CheckpointError, match="finetune_from"):
        Trainer(tiny_config(tmp_path, name="b", resume=str(ckpt)), datasets=datasets(("cat", "dog", "cow")))
    state = load_checkpoint_file(ckpt)
    state["config"]["model"]["type"] = "detr"
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="'detr'"):
        Trainer(tiny_config(tmp_path, name="c", resume=str(tmp_path / "other.pth")), datasets=datasets())
    # same type, other shape (hidden_dim): strict load names the keys
    with pytest.raises(CheckpointError, match="shape mismatch"):
        Trainer(tiny_config(tmp_path, ["model.hidden_dim=16"], name="d", resume=str(ckpt)), datasets=datasets())
    with pytest.raises(CheckpointError, match="not found"):
        Trainer(tiny_config(tmp_path, name="e", resume=str(tmp_path / "missing.pth")), datasets=datasets())


def test_resume_from_checkpoint_without_cat_ids(tmp_path):
    """Checkpoints written before ``cat_ids`` was stored still resume; the next checkpoint gains the key."""
    train(tiny_config(tmp_path, name="old", epochs=2, max_steps=2, eval_interval=-1), datasets=datasets())
    state = load_checkpoint_file(tmp_path / "old" / "checkpoint_last.pth")
    state.pop("cat_ids", None)
    torch.save(state, tmp_path / "old.pth")
    trainer = Trainer(tiny_config(tmp_path, name="new", epochs=2, eval_interval=-1, resume=str(tmp_path / "old.pth")),
                      datasets=datasets())
    assert trainer.step == 2
    trainer.fit()
    assert load_checkpoint_file(tmp_path / "new" / "checkpoint_last.pth")["cat_ids"] == datasets()[0].cat_ids
