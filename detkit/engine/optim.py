"""The learning-rate policy (AdamW parameter groups from what a detector and its backbone declare) and the per-step
learning-rate schedule."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from detkit.errors import ConfigError

log = logging.getLogger("detkit.train")


def _trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the parameters that take gradients (frozen ones are left out of every group)."""
    return ((name, param) for name, param in model.named_parameters() if param.requires_grad)


def _part(model: nn.Module, role: str) -> tuple[str, nn.Module | None]:
    """The submodule path the detector names for ``role`` in its ``lr_parts`` and the submodule (``None``: none)."""
    path = dict(getattr(model, "lr_parts", {})).get(role, "")
    return path, (model.get_submodule(path) if path else None)


def backbone_lr_groups(model: nn.Module, train: Mapping[str, Any]) -> list[dict[str, Any]]:
    """DETR's official groups: the backbone part at ``train.lr_backbone``, everything else at ``train.lr``, both with
    ``train.weight_decay``. ``lr_backbone <= 0`` leaves the whole backbone out (the official code freezes it then)."""
    prefix, _ = _part(model, "backbone")
    backbone, rest = [], []
    for name, param in _trainable(model):
        (backbone if prefix and name.startswith(prefix + ".") else rest).append(param)
    weight_decay = float(train["weight_decay"])
    groups = [{"name": "default", "params": rest, "lr": float(train["lr"]), "weight_decay": weight_decay}]
    if float(train["lr_backbone"]) > 0 and backbone:
        groups.append({"name": "backbone", "params": backbone, "lr": float(train["lr_backbone"]),
                       "weight_decay": weight_decay})
    return groups


def layer_decay_groups(model: nn.Module, train: Mapping[str, Any]) -> list[dict[str, Any]]:
    """LW-DETR's official groups (``util/get_param_dicts.py``), with timm's layer-decay convention on the backbone.

    - backbone part: ``lr_encoder * lr_vit_layer_decay^(num_layers + 1 - layer_id) * lr_component_decay^2``, where
      the backbone declares ``layer_id(name) -> int`` (0 .. ``num_layers + 1``) and ``num_layers``; no weight decay
      for the names in its ``no_weight_decay()``. A backbone that declares no layer ids (``num_layers`` missing or
      ``None``) gets no layer-wise decay: its parameters train at ``lr`` with the rest (logged once).
    - decoder part: ``lr * lr_component_decay``.
    - everything else: ``lr``.

    Parameters with equal (lr, weight decay) share a group, in the order of ``named_parameters()``.
    """
    lr, weight_decay = float(train["lr"]), float(train["weight_decay"])
    encoder_lr = float(train["lr_encoder"])
    layer_decay = float(train["lr_vit_layer_decay"])
    component_decay = float(train["lr_component_decay"])
    backbone_prefix, backbone = _part(model, "backbone")
    decoder_prefix, _ = _part(model, "decoder")
    num_layers = getattr(backbone, "num_layers", None) if backbone is not None else None
    if backbone is not None and num_layers is None:
        log.warning("%s declares no layer ids (num_layers, layer_id): no layer-wise lr decay, its parameters train "
                    "at train.lr like the rest", type(backbone).__name__)
    no_weight_decay = set(backbone.no_weight_decay()) if num_layers is not None else set()
    groups: dict[str, dict[str, Any]] = {}

    def add(group: str, param: nn.Parameter, group_lr: float, group_weight_decay: float) -> None:
        entry = groups.setdefault(group, {"name": group, "params": [], "lr": group_lr,
                                          "weight_decay": group_weight_decay})
        entry["params"].append(param)

    for name, param in _trainable(model):
        if num_layers is not None and name.startswith(backbone_prefix + "."):
            local = name[len(backbone_prefix) + 1:]
            layer_id = backbone.layer_id(local)
            scale = layer_decay ** (num_layers + 1 - layer_id)
            no_decay = local in no_weight_decay
            add(f"{backbone_prefix}.layer{layer_id}.{'no_decay' if no_decay else 'decay'}", param,
                encoder_lr * scale * component_decay**2, 0.0 if no_decay else weight_decay)
        elif decoder_prefix and name.startswith(decoder_prefix + "."):
            add("decoder", param, lr * component_decay, weight_decay)
        else:
            add("other", param, lr, weight_decay)
    return list(groups.values())


#: learning-rate policies by the name a detector gives in ``lr_policy``
LR_POLICIES: dict[str, Callable[[nn.Module, Mapping[str, Any]], list[dict[str, Any]]]] = {
    "backbone_lr": backbone_lr_groups,
    "layer_decay": layer_decay_groups,
}


def param_groups(model: nn.Module, train: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The AdamW groups of ``model`` under the policy it names in ``lr_policy`` (see :data:`LR_POLICIES`), or one
    group of every trainable parameter at ``train.lr`` / ``train.weight_decay`` when it names none. Empty groups are
    dropped."""
    policy = getattr(model, "lr_policy", None)
    if policy is None:
        groups = [{"name": "all", "params": [p for p in model.parameters() if p.requires_grad],
                   "lr": float(train["lr"]), "weight_decay": float(train["weight_decay"])}]
    elif policy in LR_POLICIES:
        groups = LR_POLICIES[policy](model, train)
    else:
        raise ConfigError(f"{type(model).__name__}.lr_policy is {policy!r}; known policies: "
                          + ", ".join(sorted(LR_POLICIES)))
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
