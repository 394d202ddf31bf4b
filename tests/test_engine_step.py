"""The optimizer step's bookkeeping: a GradScaler overflow is a skipped step, the EMA is one multi-tensor update,
cuDNN autotuning follows ``train.deterministic``, and evaluation gathers detections on rank 0 only."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.engine import tiny_config  # noqa: E402
from support.tiny_detector import TinyShapes  # noqa: E402

from detkit import plugins  # noqa: E402
from detkit.engine.callbacks.ema import EMACallback  # noqa: E402
from detkit.engine.evaluator import predict_dataset  # noqa: E402
from detkit.engine.trainer import DivergenceError, Trainer, set_deterministic  # noqa: E402


class Watch:
    """Copies of the weights and EMA weights and the scaler's scale after every optimizer step."""

    def __init__(self) -> None:
        self.weights: dict[int, torch.Tensor] = {}
        self.ema: dict[int, torch.Tensor] = {}
        self.scale: dict[int, float] = {}
        self.ok: dict[int, bool] = {}

    @plugins.hookimpl
    def detkit_after_step(self, trainer, step, losses):
        self.weights[step] = trainer.unwrapped_model.class_embed.weight.detach().clone()
        self.ema[step] = trainer.ema.module.class_embed.weight.detach().clone()
        self.scale[step] = float(trainer.scaler.get_scale())
        self.ok[step] = trainer.last_step_ok


@pytest.fixture
def watch():
    w = Watch()
    plugins.plugin_manager().register(w)
    yield w
    plugins.plugin_manager().unregister(w)


def scaled_trainer(tmp_path: Path, **train) -> Trainer:
    """The tiny detector with a GradScaler, as ``train.amp=fp16`` sets one up on a GPU (fp16 autocast itself needs
    CUDA; the scaler's bookkeeping is the same on the CPU)."""
    trainer = Trainer(tiny_config(tmp_path, epochs=2, eval_interval=-1, ema=True, ema_decay=0.5, **train),
                      datasets=(TinyShapes(16), TinyShapes(4, seed=1, flip=False)))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    return trainer


def overflow_at(trainer: Trainer, steps: set[int]) -> None:
    """A fake fp16 overflow: the class head's (scaled) gradient becomes inf during the given 1-based steps."""
    weight = trainer.unwrapped_model.class_embed.weight
    weight.register_hook(lambda g: g * float("inf") if trainer.step + 1 in steps else g)


def test_a_step_the_scaler_skips_is_counted_logged_and_leaves_weights_and_ema_alone(tmp_path, watch, caplog):
    trainer = scaled_trainer(tmp_path, max_bad_steps=3)
    overflow_at(trainer, {3})
    caplog.set_level("WARNING", logger="detkit.train")
    trainer.fit()
    assert trainer.step == 8 and trainer.skipped_steps == 1 and trainer.bad_steps == 0
    assert [s for s, ok in watch.ok.items() if not ok] == [3]
    assert torch.equal(watch.weights[3], watch.weights[2]) and torch.equal(watch.ema[3], watch.ema[2])
    assert not torch.equal(watch.ema[4], watch.ema[3])  # the EMA follows again on the next good step
    assert watch.scale[2] == 1024.0 and watch.scale[3] == 512.0  # the scaler backed off after the overflow
    assert sum("fp16 gradient overflow" in r.getMessage() for r in caplog.records) == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    bad = [r for r in rows if r["type"] == "bad_step"]
    assert [(r["step"], r["reason"], r["skipped_steps"]) for r in bad] == [(3, "scaler overflow", 1)]
    # the skip count survives in the checkpoint
    assert torch.load(tmp_path / "run" / "checkpoint_last.pth", weights_only=True)["skipped_steps"] == 1


def test_a_run_the_scaler_never_recovers_from_ends_with_max_bad_steps(tmp_path, watch):
    trainer = scaled_trainer(tmp_path, max_bad_steps=3)
    overflow_at(trainer, set(range(2, 100)))
    with pytest.raises(DivergenceError, match="train.max_bad_steps=3"):
        trainer.fit()
    assert trainer.step == 4 and trainer.skipped_steps == 3
    assert torch.equal(watch.ema[4], watch.ema[1])


def test_ema_is_one_multi_tensor_update_with_the_formula_of_the_official_code(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = EMACallback(decay=0.9, tau=3, model=model)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model(torch.randn(8, 4))  # running statistics and num_batches_tracked change
    calls = []
    lerp = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a, **k: calls.append(len(a[0])) or lerp(*a, **k))
    ema.update(model)
    d = 0.9 * (1 - torch.exp(torch.tensor(-1 / 3))).item()
    for key, value in model.state_dict().items():
        got = ema.module.state_dict()[key]
        if value.dtype.is_floating_point:
            torch.testing.assert_close(got, d * before[key] + (1 - d) * value, rtol=0, atol=1e-6)
        else:
            assert torch.equal(got, value)
    assert calls == [4 + 2]  # weights, biases, running mean and var: one call for every floating entry


def test_cudnn_autotuning_is_on_unless_deterministic():
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        set_deterministic(False)
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        set_deterministic(True)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    finally:
        set_deterministic(False)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


class _Oracle(nn.Module):
    """One detection per image: the image's own first ground-truth box."""

    def __init__(self, ds: TinyShapes) -> None:
        super().__init__()
        self.ds = ds
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, images, mask):
        return {"pred_logits": torch.zeros(images.shape[0], 1, 1), "pred_boxes": torch.zeros(images.shape[0], 1, 4)}

    def postprocessor(self, outputs, orig_sizes):
        n = outputs["pred_logits"].shape[0]
        return [{"boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "scores": torch.ones(1),
                 "labels": torch.zeros(1, dtype=torch.long)} for _ in range(n)]


def _gather_rank(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        ds = TinyShapes(5, flip=False)
        dets = predict_dataset(_Oracle(ds), ds, batch_size=2)
        Path(out, f"rank{rank}.json").write_text(json.dumps(sorted(d["image_id"] for d in dets)))
    finally:
        dist.destroy_process_group()


def test_evaluation_gathers_detections_on_rank_zero_only(tmp_path):
    mp.start_processes(_gather_rank, args=(f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")  # fork: the children need no fresh interpreter and torch import
    assert json.loads((tmp_path / "rank0.json").read_text()) == [0, 1, 2, 3, 4]
    assert json.loads((tmp_path / "rank1.json").read_text()) == []
