"""What a checkpoint format offers, and finding the format of a state dict.

A format is the official layout of one detkit model type, registered in
:data:`~detkit.registry.CHECKPOINT_FORMATS` under that type's name (``detr``, ``lwdetr``): a subclass of
:class:`CheckpointFormat`. ``model.init_from``, ``detkit convert`` and
:func:`detkit.loading.load_for_inference` find formats only through the registry, so a plugin detector registers
its own (``@CHECKPOINT_FORMATS.register("my_detector") class MyFormat(CheckpointFormat): ...``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn as nn
from torch import Tensor

from detkit.data.classes import COCO_OFFICIAL_CLASSES
from detkit.errors import CheckpointError, RegistryError
from detkit.registry import CHECKPOINT_FORMATS
from detkit.weights.report import WeightsReport

__all__ = ["CheckpointFormat", "get_format", "detect_official", "find_official", "find_detkit"]


class CheckpointFormat:
    """The official checkpoint layout of one model type (the name it is registered under).

    Subclasses set :attr:`label` and implement the four conversions / tests; :meth:`adapt_groups` and
    :meth:`official_classes` have defaults.
    """

    #: shown in load reports, e.g. "official DETR"
    label: str = ""
    #: class-head rows after the classes (DETR's no-object row: 1)
    extra_class_rows: int = 0

    def looks_official(self, state: Mapping[str, Any]) -> bool:
        """True for a state dict in the official layout."""
        raise NotImplementedError

    def looks_detkit(self, state: Mapping[str, Any]) -> bool:
        """True for a state dict of the detkit model of this type."""
        raise NotImplementedError

    def to_detkit(self, state: Mapping[str, Any], model_cfg: Mapping[str, Any] | None = None,
                  inference_only: bool | None = None) -> dict[str, Tensor]:
        """Official state dict -> detkit state dict (keys renamed, tensors shared); ``model_cfg`` (the plain
        ``model:`` section, or ``None``) may be checked against; ``inference_only`` drops training-only parts."""
        raise NotImplementedError

    def to_official(self, state: Mapping[str, Any], model_cfg: Mapping[str, Any] | None = None,
                    inference_only: bool | None = None) -> dict[str, Tensor]:
        """detkit state dict -> official state dict (the inverse of :meth:`to_detkit`)."""
        raise NotImplementedError

    def adapt_groups(self, model: nn.Module, state: dict[str, Tensor], report: WeightsReport) -> dict[str, Tensor]:
        """A detkit-layout ``state`` fitted to ``model``'s training-time query groups (Group-DETR); the default
        changes nothing. Shape changes are noted in ``report.notes``."""
        return state

    def official_classes(self, state: Mapping[str, Tensor]) -> list[str] | None:
        """Class names of a converted official checkpoint whose class head has COCO's 91 slots (plus
        :attr:`extra_class_rows`); ``None`` otherwise."""
        for key in ("class_embed.weight", "head.class_embed.weight"):
            if key in state and state[key].shape[0] - self.extra_class_rows == len(COCO_OFFICIAL_CLASSES):
                return list(COCO_OFFICIAL_CLASSES)
        return None


def get_format(name: str) -> CheckpointFormat:
    """The registered format ``name``; an unknown name is a :class:`CheckpointError` listing the known ones."""
    try:
        factory = CHECKPOINT_FORMATS.get(name)
    except RegistryError as e:
        raise CheckpointError(f"unknown checkpoint format {name!r} (known: "
                              f"{', '.join(CHECKPOINT_FORMATS.names())}, auto)") from e
    return factory()


def _formats() -> list[tuple[str, CheckpointFormat]]:
    return [(name, get_format(name)) for name in CHECKPOINT_FORMATS.names()]


def find_official(state: Mapping[str, Any]) -> tuple[str, CheckpointFormat] | None:
    """``(name, format)`` of the first registered format whose official layout ``state`` has, else ``None``."""
    return next(((n, f) for n, f in _formats() if f.looks_official(state)), None)


def find_detkit(state: Mapping[str, Any]) -> tuple[str, CheckpointFormat] | None:
    """``(name, format)`` of the first registered format whose detkit model ``state`` is, else ``None``."""
    return next(((n, f) for n, f in _formats() if f.looks_detkit(state)), None)


def detect_official(state: Mapping[str, Any], where: object) -> str:
    """The one registered format whose official layout ``state`` has; none or several is a
    :class:`CheckpointError` that asks for ``--format``."""
    found = [name for name, fmt in _formats() if fmt.looks_official(state)]
    if len(found) != 1:
        what = "no" if not found else "more than one"
        names = ",".join(CHECKPOINT_FORMATS.names())
        raise CheckpointError(f"{where}: --format auto found {what} matching official layout ({', '.join(found)}); "
                              f"name it with --format {{{names}}}")
    return found[0]
