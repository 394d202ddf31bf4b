"""Undo what a skipped step's forward passes did to the model's normalisation statistics."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from detkit.plugins import hookimpl
from detkit.registry import CALLBACKS


def running_stat_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The buffers that a training forward pass changes in place: ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` of every batch / instance norm layer that tracks running statistics (LW-DETR's
    projector has such BatchNorm layers; DETR's ResNet has frozen ones, which have none)."""
    return [buffer
            for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
            for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
            if buffer is not None]


@CALLBACKS.register("running_stats")
class RunningStatsCallback:
    """Keeps a copy of the running statistics as of the last successful optimizer step and puts it back after a
    skipped one (non-finite loss or gradient), before the other callbacks see the step.

    A skipped step must leave the model as it was, but its training forward passes have already updated the
    running statistics; a diverged step's NaN would stay in them for good (every later evaluation NaN, the EMA copy
    and the checkpoints too). The copy is one device-side clone per buffer and step, no host sync (LW-DETR tiny:
    a few thousand values).

    :param model: the model being trained (injected by the trainer).
    """

    name = "running_stats"

    def __init__(self, model: nn.Module | None = None) -> None:
        if model is None:
            raise ValueError("the running_stats callback needs the model (the trainer injects it)")
        self.buffers = running_stat_buffers(model)
        self.saved: list[torch.Tensor] = []

    @torch.no_grad()
    def capture(self) -> None:
        self.saved = [b.detach().clone() for b in self.buffers]

    @torch.no_grad()
    def restore(self) -> None:
        for buffer, copy in zip(self.buffers, self.saved, strict=True):
            buffer.copy_(copy)

    @hookimpl
    def detkit_train_start(self, trainer: Any) -> None:
        self.capture()  # after a resume: the checkpoint's statistics

    @hookimpl(tryfirst=True)  # before the EMA, checkpoint and logger callbacks look at the model
    def detkit_after_step(self, trainer: Any, step: int, losses: dict[str, float]) -> None:
        if not self.buffers:
            return
        if trainer.last_step_ok:
            self.capture()
        else:
            self.restore()
