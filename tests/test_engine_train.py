"""Training loop: hooks, run-directory outputs, divergence handling, early errors, sampler and schedule."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.engine import tiny_config  # noqa: E402
from support.tiny_detector import TinyShapes  # noqa: E402

from detkit import plugins  # noqa: E402
from detkit.weights.io import load_checkpoint_file  # noqa: E402
from detkit.engine.optim import LRFactor, build_optimizer  # noqa: E402
from detkit.engine.sampling import EpochBatchSampler  # noqa: E402
from detkit.engine.trainer import DivergenceError, Trainer, train  # noqa: E402
from detkit.errors import ConfigError, DataError  # noqa: E402


def datasets(n=16):
    return TinyShapes(n), TinyShapes(6, seed=1, flip=False)


class Recorder:
    def __init__(self):
        self.calls = []

    @plugins.hookimpl
    def detkit_train_start(self, trainer):
        self.calls.append(("start", trainer.step))

    @plugins.hookimpl
    def detkit_after_step(self, trainer, step, losses):
        self.calls.append(("step", step, sorted(losses)))

    @plugins.hookimpl
    def detkit_after_epoch(self, trainer, epoch, metrics):
        self.calls.append(("epoch", epoch, "train_loss" in metrics, "val_AP" in metrics))

    @plugins.hookimpl
    def detkit_after_eval(self, trainer, epoch, metrics):
        self.calls.append(("eval", epoch, metrics["AP"]))

    @plugins.hookimpl
    def detkit_train_end(self, trainer, metrics):
        self.calls.append(("end", trainer.step, sorted(metrics)[:2]))


@pytest.fixture
def recorder():
    rec = Recorder()
    plugins.plugin_manager().register(rec)
    yield rec
    plugins.plugin_manager().unregister(rec)


def test_hooks_fire_and_outputs_are_written(tmp_path, recorder):
    cfg = tiny_config(tmp_path, ["runtime.tensorboard=true", "runtime.plot=true"], epochs=2, eval_interval=1,
                      log_interval=2)
    metrics = train(cfg, datasets=datasets(8))  # 2 steps per epoch
    kinds = [c[0] for c in recorder.calls]
    assert kinds == ["start", "step", "step", "eval", "epoch", "step", "step", "eval", "epoch", "end"]
    assert recorder.calls[1][2] == sorted(["loss", "loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0",
                                           "loss_giou_0", "class_error"])
    assert recorder.calls[4][2:] == (True, True)
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == [2, 4]
    assert [r["epoch"] for r in rows if r["type"] == "eval"] == [0, 1]
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 for r in rows if r["type"] == "train")
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert {"config.yaml", "plugins.json", "classes.json", "train.log", "checkpoint_last.pth",
            "checkpoint_best.pth"} <= {p.name for p in run.iterdir()}
    assert "local:support.tiny_detector" in (run / "plugins.json").read_text() or \
        "support.tiny_detector" in (run / "plugins.json").read_text()
    ckpt = load_checkpoint_file(run / "checkpoint_last.pth")
    assert ckpt["classes"] == ["red", "green", "blue"] and ckpt["config"]["model"]["num_classes"] == 3
    assert {"model", "optimizer", "scheduler", "ema", "scaler", "epoch", "step", "rng", "config", "classes",
            "plugins", "detkit_version"} <= set(ckpt)


def test_nan_steps_are_skipped_and_training_continues(tmp_path, caplog):
    cfg = tiny_config(tmp_path, ["model.nan_after=2", "model.nan_count=3"], epochs=2, max_bad_steps=4,
                      eval_interval=-1)
    trainer = Trainer(cfg, datasets=datasets())
    before = {k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()}
    caplog.set_level("WARNING", logger="detkit.train")
    trainer.fit()
    assert trainer.step == 8 and trainer.bad_steps == 0
    assert sum("non-finite loss, step skipped" in r.getMessage() for r in caplog.records) == 3
    after = trainer.unwrapped_model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert not torch.equal(before["class_embed.weight"], after["class_embed.weight"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "bad_step"] == [3, 4, 5]


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, ["model.nan_after=5", "model.nan_count=100"], epochs=3, max_bad_steps=3,
                      checkpoint_steps=1, eval_interval=-1)
    with pytest.raises(DivergenceError, match="train.max_bad_steps=3") as err:
        train(cfg, datasets=datasets())
    assert "checkpoint_last.pth" in str(err.value)
    ckpt = load_checkpoint_file(tmp_path / "run" / "checkpoint_last.pth")
    assert ckpt["step"] == 5  # the last good step; bad steps 6-8 wrote nothing
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_unwritable_output_dir_fails_before_any_step(tmp_path, recorder):
    (tmp_path / "file").write_text("not a directory")
    cfg = tiny_config(tmp_path, [f"runtime.output_dir={tmp_path / 'file' / 'run'}"])
    with pytest.raises(ConfigError, match="not writable") as err:
        train(cfg, datasets=datasets())
    assert str(tmp_path / "file" / "run") in str(err.value)
    assert recorder.calls == []


def test_missing_data_root_fails_before_any_step(tmp_path, recorder):
    cfg = tiny_config(tmp_path, [f"data.root={tmp_path / 'nowhere'}", "data.format=coco"])
    with pytest.raises(DataError) as err:
        Trainer(cfg)  # builds the data sets from cfg.data
    assert "nowhere" in str(err.value)
    assert recorder.calls == [] and not list((tmp_path / "run").glob("*.pth"))


def test_num_classes_too_small_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="num_classes=2 but the data set has 3"):
        Trainer(tiny_config(tmp_path, ["model.num_classes=2"]), datasets=datasets())


def test_sampler_order_is_a_function_of_seed_and_epoch_and_ranks_split_the_global_batch():
    one = EpochBatchSampler(10, 4, seed=3, world_size=1)
    one.set_epoch(2)
    full = [[i for i, _ in b] for b in one]
    again = EpochBatchSampler(10, 4, seed=3)
    again.set_epoch(2, start_batch=1)
    assert [[i for i, _ in b] for b in again] == full[1:]  # resume skips done batches
    other = EpochBatchSampler(10, 4, seed=3)
    other.set_epoch(3)
    assert [[i for i, _ in b] for b in other] != full
    ranks = []
    for r in range(2):
        s = EpochBatchSampler(10, 2, seed=3, rank=r, world_size=2)
        s.set_epoch(2)
        ranks.append([[i for i, _ in b] for b in s])
    assert len(ranks[0]) == len(ranks[1]) == len(full) == 3
    for b in range(2):
        assert ranks[0][b] + ranks[1][b] == full[b]
    assert sorted(i for b in full for i in b) == list(range(10))
    # the per-sample seeds depend on (seed, epoch, index) only
    seeds = {i: s for b in one for i, s in b}
    s2 = EpochBatchSampler(10, 3, seed=3)
    s2.set_epoch(2)
    assert all(s == seeds[i] for b in s2 for i, s in b)


def test_lr_schedules():
    step = LRFactor("step", steps_per_epoch=10, total_steps=100, warmup_iters=5, lr_drop=4, lr_drop_factor=0.1)
    assert [round(step(s), 6) for s in (0, 4, 5, 39, 40, 99)] == [0.2, 1.0, 1.0, 1.0, 0.1, 0.1]
    cos = LRFactor("cosine", steps_per_epoch=10, total_steps=110, warmup_iters=10, min_lr_ratio=0.1)
    assert cos(9) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cos(110) == pytest.approx(0.1)
    with pytest.raises(ConfigError):
        LRFactor("linear", 1, 1)


def test_optimizer_is_fused_adamw_and_steps_like_the_reference():
    """build_optimizer picks the fused AdamW on CPU; its update equals the per-tensor implementation's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    ref = copy.deepcopy(model)
    train_cfg = {"lr": 1e-2, "weight_decay": 1e-4}
    opt = build_optimizer(model, train_cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=1e-4, foreach=False)
    x = torch.randn(16, 4)
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_early_stopping_and_best_checkpoint(tmp_path):
    # lr 0: the metric never improves after the first evaluation, so patience 1 stops after the second one
    trainer = Trainer(tiny_config(tmp_path, epochs=5, lr=0.0, lr_backbone=0.0, early_stop_patience=1),
                      datasets=datasets(8))
    trainer.fit()
    assert trainer.epoch == 2 and "early stop" in trainer.stop_reason
    best = load_checkpoint_file(tmp_path / "run" / "checkpoint_best.pth")
    assert best["best"]["epoch"] == 0 and best["epoch"] == 1


def test_bf16_autocast_on_cpu_keeps_losses_in_fp32(tmp_path):
    seen = []

    class Spy:
        @plugins.hookimpl
        def detkit_after_step(self, trainer, step, losses):
            seen.append(losses["loss"])

    pm = plugins.plugin_manager()
    spy = Spy()
    pm.register(spy)
    try:
        trainer = Trainer(tiny_config(tmp_path, epochs=1, amp="bf16", max_steps=2, eval_interval=-1),
                          datasets=datasets(8))
        calls = []
        original = trainer.criterion.forward
        trainer.criterion.forward = lambda outputs, targets: (calls.append(outputs["pred_logits"].dtype),
                                                               original(outputs, targets))[1]
        trainer.fit()
    finally:
        pm.unregister(spy)
    assert calls == [torch.float32, torch.float32] and len(seen) == 2 and all(math.isfinite(v) for v in seen)
