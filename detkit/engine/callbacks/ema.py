"""Exponential moving average of the model weights (``train.ema``), updated after every optimizer step."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from detkit.plugins import hookimpl
from detkit.registry import CALLBACKS


@CALLBACKS.register("ema")
class EMACallback:
    """Keeps ``module``, a copy of the model whose every state-dict entry (buffers included, as the official
    LW-DETR ``ModelEma``) follows ``ema = d * ema + (1 - d) * model`` after each successful optimizer step.

    :param decay: the decay ``d``.
    :param tau: warm-up: ``d_t = decay * (1 - exp(-t / tau))`` after ``t`` updates, so early weights are not
        frozen in; 0 keeps ``d`` constant.
    :param model: the model to follow (injected by the trainer).
    """

    name = "ema"

    def __init__(self, decay: float = 0.9997, tau: int = 0, model: nn.Module | None = None) -> None:
        if model is None:
            raise ValueError("the ema callback needs the model (the trainer injects it)")
        self.decay = float(decay)
        self.tau = int(tau)
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        if self.tau > 0:
            return self.decay * (1 - math.exp(-self.updates / self.tau))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema = d * ema + (1 - d) * model`` for every floating state entry, as one multi-tensor operation
        (``torch._foreach_lerp_``: ``ema + (1 - d) * (model - ema)``) per dtype and device; integer buffers are
        copied."""
        self.updates += 1
        d = self.current_decay()
        own = self.module.state_dict()
        floating: dict[tuple[torch.dtype, torch.device], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for key, value in model.state_dict().items():
            ema = own[key]
            if ema.dtype.is_floating_point:
                group = floating.setdefault((ema.dtype, ema.device), ([], []))
                group[0].append(ema)
                group[1].append(value.detach().to(ema.dtype))
            else:
                ema.copy_(value)
        for ema_list, model_list in floating.values():
            torch._foreach_lerp_(ema_list, model_list, 1 - d)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state.get("updates", 0))

    @hookimpl(tryfirst=True)  # before the checkpoint callback saves this step
    def detkit_after_step(self, trainer: Any, step: int, losses: dict[str, float]) -> None:
        if trainer.last_step_ok:
            self.update(trainer.unwrapped_model)
