"""Writes ``checkpoint_last.pth`` (every few epochs and every few steps/minutes) and ``checkpoint_best.pth``."""

from __future__ import annotations

import time
from typing import Any

from detkit.plugins import hookimpl
from detkit.registry import CALLBACKS


@CALLBACKS.register("checkpoint")
class CheckpointCallback:
    """Checkpointing policy; the trainer assembles the state and writes it atomically (rank 0 only).

    A SIGKILL at any moment loses at most ``interval_steps`` optimizer steps or ``interval_minutes`` of work,
    whichever comes first; ``train.resume=auto`` continues from ``checkpoint_last.pth`` exactly.

    :param interval_epochs: write ``checkpoint_last.pth`` after every N-th epoch (and always after the last one).
    :param interval_steps: also write it every N optimizer steps inside an epoch (0 = off).
    :param interval_minutes: also write it once this many minutes passed since the last write (0 = off).
    """

    name = "checkpoint"

    def __init__(self, interval_epochs: int = 1, interval_steps: int = 0, interval_minutes: float = 5.0) -> None:
        self.interval_epochs = max(int(interval_epochs), 1)
        self.interval_steps = int(interval_steps)
        self.interval_minutes = float(interval_minutes)
        self._last_write = time.monotonic()

    @hookimpl
    def detkit_train_start(self, trainer: Any) -> None:
        self._last_write = time.monotonic()

    @hookimpl(trylast=True)  # after EMA and plugins updated their state for this step
    def detkit_after_step(self, trainer: Any, step: int, losses: dict[str, float]) -> None:
        if not trainer.is_main:
            return
        due = self.interval_steps > 0 and step % self.interval_steps == 0
        due |= self.interval_minutes > 0 and time.monotonic() - self._last_write >= 60 * self.interval_minutes
        if due and trainer.last_step_ok:
            trainer.save_checkpoint("checkpoint_last.pth")
            self._last_write = time.monotonic()

    @hookimpl(trylast=True)
    def detkit_after_epoch(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        if not trainer.is_main:
            return
        final = trainer.epoch >= trainer.cfg.train.epochs or trainer.stopping
        if (epoch + 1) % self.interval_epochs == 0 or final:
            trainer.save_checkpoint("checkpoint_last.pth")
            self._last_write = time.monotonic()
        if trainer.best_improved_at == epoch:
            trainer.save_checkpoint("checkpoint_best.pth")
