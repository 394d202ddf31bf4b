"""Putting a state dict into a model: the one EMA-or-model picker, strict copies, and the fitting detector load.

:func:`load_state_dict` copies a state dict of the same layout (strict by default: resume, inference);
:func:`load_detector_state` fits one that may differ (fine-tuning on other classes, other query groups, another
position grid) and reports every key in a :class:`~detkit.weights.report.WeightsReport`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from detkit.data.classes import CLASS_MAPS
from detkit.errors import CheckpointError
from detkit.registry import CHECKPOINT_FORMATS
from detkit.weights.class_rows import fit_names, is_class_head_key, load_class_map, row_pairs
from detkit.weights.formats.base import get_format
from detkit.weights.io import load_checkpoint_file
from detkit.weights.report import WeightsReport

__all__ = ["EMA_ENTRIES", "MODEL_ENTRIES", "pick_state", "load_state_dict", "load_checkpoint", "resize_pos_embed",
           "place", "load_detector_state"]

#: checkpoint entries holding EMA weights, in the order they are looked for (detkit, official LW-DETR)
EMA_ENTRIES = ("ema", "ema_model")
#: checkpoint entries holding the model's weights, in the order they are looked for
MODEL_ENTRIES = ("model", "state_dict", "module")


def _tensors(state: Any, where: str) -> dict[str, Tensor]:
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{where}: no state dict")
    bad = [str(k) for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{where}: not a state dict (entries that are not tensors: {', '.join(bad[:5])})")
    return dict(state)


def pick_state(ckpt: Mapping[str, Any], use_ema: bool | None, where: object, no_ema: str = "",
               model_entries: Sequence[str] = MODEL_ENTRIES, bare: bool = True,
               no_model: str = "") -> tuple[dict[str, Tensor], str]:
    """``(state dict, entry)``: the EMA or the model weights of a checkpoint dict.

    :param use_ema: ``None``: the EMA weights when the checkpoint has them, else the model's; ``True``: the EMA
        weights (``ema`` / ``ema_model``; the ``module`` of an EMA wrapper's state), a :class:`CheckpointError`
        ending in ``no_ema`` when there are none; ``False``: the model's.
    :param model_entries: entries holding the model's weights, the first one that is a state dict wins.
    :param bare: with no such entry, take the dict itself as the state dict (a bare ``torch.save(state_dict)``);
        otherwise a :class:`CheckpointError` ending in ``no_model``.
    """
    ema_entry = next((k for k in EMA_ENTRIES if isinstance(ckpt.get(k), Mapping) and ckpt.get(k)), None)
    if use_ema or (use_ema is None and ema_entry):
        if ema_entry is None:
            raise CheckpointError(f"{where} has no EMA weights {no_ema}".rstrip())
        value = ckpt[ema_entry]
        return _tensors(value.get("module", value), f"{where} '{ema_entry}'"), ema_entry
    for key in model_entries:
        value = ckpt.get(key)
        if isinstance(value, Mapping) and value and all(isinstance(v, Tensor) for v in value.values()):
            return dict(value), key
    if bare:
        return _tensors(ckpt, str(where)), ""
    entries = ", ".join(map(str, ckpt)) or "none"
    raise CheckpointError(f"{where} has no {model_entries[0]!r} weights (entries: {entries}){no_model}")


def load_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True,
                    source: str = "") -> WeightsReport:
    """Copy ``state`` into ``model`` and report loaded / missing / unexpected / reshaped keys.

    With ``strict=True`` any missing, unexpected or reshaped key is a :class:`CheckpointError` listing them.
    """
    own = model.state_dict()
    report = WeightsReport(source=source)
    usable: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(own[key].shape) != tuple(value.shape):
            report.reinitialised.append(key)
            report.notes[key] = f"{tuple(value.shape)}->{tuple(own[key].shape)}"
        else:
            usable[key] = value
            report.loaded.append(key)
    report.reinitialised.extend(k for k in own if k not in state)
    if strict and not report.ok:
        raise CheckpointError(f"checkpoint does not fit the model:\n{report.table()}\n" + report.detail())
    model.load_state_dict(usable, strict=False)
    return report


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str], strict: bool = True,
                    use_ema: bool = False) -> WeightsReport:
    """Load the weights of a detkit checkpoint into ``model`` (``weights_only``) and return its report.

    :param use_ema: take the EMA weights when the checkpoint has them.
    """
    ckpt = load_checkpoint_file(path)
    state, _ = pick_state(ckpt, None if use_ema else False, path, model_entries=("model",), bare=False)
    return load_state_dict(model, state, strict=strict, source=str(path))


def _grid(n: int) -> tuple[int, int] | None:
    """``(class slots, side)`` for a position table of ``n`` tokens: ``side^2`` or ``side^2 + 1``."""
    for extra in (1, 0):
        side = math.isqrt(n - extra) if n - extra > 0 else 0
        if side and side * side == n - extra:
            return extra, side
    return None


def resize_pos_embed(pos: Tensor, shape: Sequence[int]) -> Tensor:
    """A ViT position table ``(1, [1 +] g^2, D)`` resized to ``shape = (1, [1 +] G^2, D)``: the grid part
    bicubic-interpolated (``align_corners=False``) from ``g x g`` to ``G x G``, the class slot kept (or zero)."""
    src, dst = _grid(pos.shape[1]), _grid(int(shape[1]))
    if pos.dim() != 3 or len(shape) != 3 or src is None or dst is None or pos.shape[2] != shape[2]:
        raise ValueError(f"cannot resize a position embedding {tuple(pos.shape)} to {tuple(shape)}")
    (extra_s, g), (extra_d, gd) = src, dst
    d = pos.shape[2]
    grid = pos[:, extra_s:].reshape(1, g, g, d).permute(0, 3, 1, 2).float()
    if g != gd:
        grid = F.interpolate(grid, size=(gd, gd), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, gd * gd, d).to(pos.dtype)
    if not extra_d:
        return grid
    cls = pos[:, :1] if extra_s else torch.zeros(1, 1, d, dtype=pos.dtype)
    return torch.cat([cls, grid], dim=1)


def place(usable: dict[str, Tensor], name: str, full: str, value: Tensor, target: Tensor, report: WeightsReport,
          fitted: list[str]) -> None:
    """Put checkpoint tensor ``value`` at ``usable[name]`` when it fits ``target`` (then ``full`` joins ``fitted``);
    a position embedding of another grid is resized; anything else keeps its initialisation (reported)."""
    if tuple(value.shape) == tuple(target.shape):
        usable[name] = value
        fitted.append(full)
        return
    if name.endswith("pos_embed"):
        try:
            usable[name] = resize_pos_embed(value, target.shape)
        except ValueError:
            report.reinitialised.append(full)
        else:
            report.resized.append(full)
    else:
        report.reinitialised.append(full)
    report.notes[full] = f"{tuple(value.shape)}->{tuple(target.shape)}"


def load_detector_state(model: nn.Module, state: Mapping[str, Tensor], report: WeightsReport,
                        new_classes: Sequence[str] | None = None, old_classes: Sequence[str] | None = None,
                        class_map: Mapping[str, Any] | str | None = None,
                        original_keys: set[str] | None = None) -> WeightsReport:
    """Copy a detkit-layout ``state`` into ``model``, fitting what can be fitted, and fill ``report``.

    Same-shape keys are copied; class heads (``*class_embed*`` with ``num_classes`` or ``num_classes + 1`` rows)
    are matched row by row by class name / ``class_map`` when the class lists differ (extra rows, DETR's no-object,
    are kept); LW-DETR query groups and ViT position grids are resized; everything else that does not fit stays as
    initialised. Nothing raises except a ``class_map`` error: the report tells what happened.

    :param original_keys: the file's key names before conversion (a loaded key not among them was converted).
    """
    own = model.state_dict()
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None and new_classes is not None:
        num_classes = len(new_classes)
    cmap = load_class_map(class_map)
    if isinstance(class_map, str) and class_map in CLASS_MAPS and new_classes is not None:
        # a built-in map covers a whole label set (COCO): a data set with a part of it uses that part
        cmap = {k: v for k, v in cmap.items() if k in set(new_classes)}
    state = dict(state)
    for name in CHECKPOINT_FORMATS.names():  # LW-DETR: query groups fitted to the model's
        state = get_format(name).adapt_groups(model, state, report)
    pairs_cache: dict[tuple[int, int], list[tuple[int, int]] | None] = {}
    usable: dict[str, Tensor] = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        target = own[key]
        renamed = original_keys is not None and key not in original_keys
        if num_classes is not None and is_class_head_key(key, tuple(target.shape), num_classes):
            extra = target.shape[0] - num_classes
            n_old = value.shape[0] - extra
            if n_old >= 1 and tuple(value.shape[1:]) == tuple(target.shape[1:]):
                if (n_old, num_classes) not in pairs_cache:
                    pairs_cache[(n_old, num_classes)] = row_pairs(
                        fit_names(new_classes, num_classes), fit_names(old_classes, n_old), num_classes, n_old,
                        cmap, report)
                pairs = pairs_cache[(n_old, num_classes)]
                if pairs is None:  # the same classes in the same rows
                    usable[key] = value
                    (report.converted if renamed else report.loaded).append(key)
                    continue
                if pairs or extra:
                    merged = target.detach().to("cpu", copy=True)
                    if pairs:
                        rows_new, rows_old = zip(*pairs)
                        merged[list(rows_new)] = value[list(rows_old)].to(merged.dtype)
                    if extra:
                        merged[num_classes:] = value[n_old:].to(merged.dtype)
                    usable[key] = merged
                    report.class_rows.append(key)
                    report.notes[key] = f"{len(pairs)}/{num_classes} rows from {n_old}"
                    continue
            report.reinitialised.append(key)
            report.notes[key] = f"{tuple(value.shape)}->{tuple(target.shape)}"
            continue
        fitted = report.resized if key in report.notes else (report.converted if renamed else report.loaded)
        place(usable, key, key, value, target, report, fitted)
    report.reinitialised.extend(k for k in own if k not in state)
    model.load_state_dict(usable, strict=False)
    return report
