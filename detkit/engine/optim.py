"""AdamW over the detector's own parameter groups, and the per-step learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from detkit.errors import ConfigError


def param_groups(model: nn.Module, train: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The model's ``param_groups(train)`` (official groups), or one group of every trainable parameter."""
    fn = getattr(model, "param_groups", None)
    if callable(fn):
        groups = [dict(g) for g in fn(train)]
    else:
        groups = [{"name": "all", "params": [p for p in model.parameters() if p.requires_grad],
                   "lr": float(train["lr"]), "weight_decay": float(train["weight_decay"])}]
    groups = [g for g in groups if list(g["params"])]
    seen: set[int] = set()
    for g in groups:
        g["params"] = list(g["params"])
        for p in g["params"]:
            if id(p) in seen:
                raise ValueError(f"parameter group {g.get('name')!r} repeats a parameter of another group")
            seen.add(id(p))
    return groups


def build_optimizer(model: nn.Module, train: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW with the model's parameter groups (the fused kernel on CPU and CUDA); each group keeps its ``lr`` as
    ``initial_lr`` for the schedule."""
    groups = param_groups(model, train)
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    params = [p for g in groups for p in g["params"]]
    # The fused kernel (one pass over every tensor, no temporaries) on CPU and CUDA; multi-tensor elsewhere.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=float(train["lr"]), weight_decay=float(train["weight_decay"]), **kwargs)


class LRFactor:
    """Multiplier of every group's base lr at optimizer step ``s`` (0-based): linear warm-up, then step or cosine.

    - ``step``: ``lr_drop_factor`` once the epoch index (``s // steps_per_epoch``) reaches ``lr_drop``, as the
      official ``StepLR(lr_drop)`` stepped once per epoch;
    - ``cosine``: from 1 at the end of warm-up to ``min_lr_ratio`` at ``total_steps``.
    """

    def __init__(self, schedule: str, steps_per_epoch: int, total_steps: int, warmup_iters: int = 0,
                 lr_drop: int = 200, lr_drop_factor: float = 0.1, min_lr_ratio: float = 0.0) -> None:
        if schedule not in ("step", "cosine"):
            raise ConfigError(f"train.lr_schedule must be 'step' or 'cosine', got {schedule!r}")
        self.schedule = schedule
        self.steps_per_epoch = max(int(steps_per_epoch), 1)
        self.total_steps = max(int(total_steps), 1)
        self.warmup_iters = int(warmup_iters)
        self.lr_drop = int(lr_drop)
        self.lr_drop_factor = float(lr_drop_factor)
        self.min_lr_ratio = float(min_lr_ratio)
        self.planned_steps = self.total_steps
        self.drop_step: int | None = None  # set by fit(): the step decay at a step instead of an epoch

    def fit(self, total_steps: int) -> None:
        """Fit the schedule to a run of ``total_steps`` instead of the planned length (``train.max_minutes``): the
        cosine ends there, and a step decay planned before the end moves with it (same fraction of the run)."""
        total_steps = max(int(total_steps), 1)
        planned_drop = self.lr_drop * self.steps_per_epoch
        if self.schedule == "step" and planned_drop < self.planned_steps:
            self.drop_step = round(planned_drop * total_steps / self.planned_steps)
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_iters) if self.warmup_iters > 0 else 1.0
        if self.schedule == "step":
            dropped = step >= self.drop_step if self.drop_step is not None else \
                step // self.steps_per_epoch >= self.lr_drop
            return warm * (self.lr_drop_factor if dropped else 1.0)
        span = max(self.total_steps - self.warmup_iters, 1)
        progress = min(max(step - self.warmup_iters, 0) / span, 1.0)
        return warm * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, train: Mapping[str, Any], steps_per_epoch: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per optimizer step."""
    factor = LRFactor(str(train["lr_schedule"]), steps_per_epoch, total_steps, int(train["warmup_iters"]),
                      int(train["lr_drop"]), float(train["lr_drop_factor"]), float(train["min_lr_ratio"]))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
