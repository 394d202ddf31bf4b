"""The parts of one optimizer step: forward and backward over the micro-batches, then one reduced check.

:meth:`~detkit.engine.trainer.Trainer._optimizer_step` runs :func:`forward_backward`, then :func:`reduce_step` (clip
the gradients, all-reduce the non-finite-loss flag, the gradient norm and the logged losses in one vector, read to
the host once) and takes or skips the step from what that says.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from detkit.engine import distributed as du
from detkit.errors import DetkitError

#: why a step was skipped (``Trainer.last_skip_reason``) -> the warning's words
SKIP_MESSAGES = {"loss": "non-finite loss", "gradient": "non-finite gradient",
                 "scaler overflow": "fp16 gradient overflow (the GradScaler lowers its scale)"}


class DivergenceError(DetkitError):
    """Training produced non-finite losses or gradients for ``train.max_bad_steps`` consecutive steps."""


def _to_device(targets: Sequence[Mapping[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
            for t in targets]


def _to_float(obj: Any) -> Any:
    """Cast every floating tensor of a (nested) model output to fp32, so losses and matching run in fp32."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, Mapping):
        return {k: _to_float(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_float(v) for v in obj)
    return obj


def forward_backward(model: nn.Module, criterion: nn.Module, window: Sequence[Any], device: torch.device,
                     amp_dtype: torch.dtype | None, scaler: torch.amp.GradScaler | None, world_size: int
                     ) -> dict[str, torch.Tensor]:
    """Forward and backward of every ``(images, mask, targets)`` micro-batch of ``window`` (whatever its loss, so
    that all ranks issue the same collectives; DDP syncs the gradients on the last one only). Returns the window's
    mean of each scalar loss, as 0-d device tensors (no host synchronisation)."""
    logged: dict[str, torch.Tensor] = {}
    for i, (images, mask, targets) in enumerate(window):
        images = images.to(device, non_blocking=True)
        mask = mask.to(device, non_blocking=True)
        targets = _to_device(targets, device)
        sync = i == len(window) - 1
        ctx = model.no_sync() if (world_size > 1 and not sync) else contextlib.nullcontext()
        with ctx:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = model(images, mask)
            with torch.autocast(device.type, enabled=False):
                losses = criterion(_to_float(outputs), targets)
            loss = losses["loss"]
            for k, v in losses.items():
                if isinstance(v, torch.Tensor) and v.numel() == 1 and (k == "loss" or k.startswith("loss_")
                                                                       or v.dtype.is_floating_point):
                    logged[k] = logged.get(k, 0.0) + v.detach().float().reshape(()) / len(window)
            scaled = loss / len(window)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
    return logged


def reduce_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, clip_max_norm: float,
                logged: Mapping[str, torch.Tensor], device: torch.device) -> tuple[bool, float, dict[str, float]]:
    """``(loss_ok, grad_norm, losses)`` of the step, the same on every rank: the gradients unscaled and clipped, then
    one all-reduced vector (non-finite loss flag, gradient norm, logged losses) read to the host once, the step's
    one host synchronisation."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if scaler is not None:
        scaler.unscale_(optimizer)  # no host sync: the overflow shows in the gradient norm below
    max_norm = float(clip_max_norm) if clip_max_norm > 0 else float("inf")
    norm = (torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True) if params
            else torch.zeros((), device=device))
    keys = sorted(logged)
    zero = torch.zeros((), device=device)
    loss_bad = (~torch.isfinite(logged["loss"])).float() if "loss" in logged else zero
    stats = torch.stack([loss_bad.reshape(()).to(device), norm.detach().float().reshape(()).to(device),
                         *[torch.as_tensor(logged[k], device=device).reshape(()) for k in keys]])
    du.all_reduce(stats, "mean")  # the gradients are already reduced, so the norm's mean is the norm
    host = stats.tolist()  # the step's one host synchronisation
    return host[0] == 0.0, float(host[1]), dict(zip(keys, host[2:]))

