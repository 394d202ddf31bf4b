"""Official facebookresearch/detr state dicts <-> detkit DETR state dicts.

The layouts differ only by key prefixes (see :class:`detkit.models.detectors.detr.DETR`); tensors are passed through
unchanged, so a converted model gives the official outputs logit for logit. FrozenBatchNorm2d has no
``num_batches_tracked``; such keys (from a checkpoint saved with ordinary batch norm) are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from detkit.registry import CHECKPOINT_FORMATS
from detkit.weights.formats.base import CheckpointFormat
from detkit.weights.formats.prefixes import rename_prefixes

__all__ = ["DETRFormat", "official_to_detkit", "detkit_to_official", "looks_official", "looks_detkit", "PREFIXES"]

#: (official prefix, detkit prefix); the first match wins
PREFIXES: tuple[tuple[str, str], ...] = (
    ("backbone.0.body.", "backbone.body."),
    ("backbone.1.", "position_encoding."),
    ("input_proj.", "neck.proj."),
    ("class_embed.", "head.class_embed."),
    ("bbox_embed.", "head.bbox_embed."),
    ("transformer.", "transformer."),
    ("query_embed.", "query_embed."),
)


def official_to_detkit(state: Mapping[str, Any], **opts: Any) -> dict[str, Tensor]:
    """Official DETR ``model`` state dict -> detkit DETR state dict (keys renamed, tensors shared).

    ``opts`` (e.g. ``model_cfg``) are accepted for interface symmetry with other converters and unused.
    """
    return rename_prefixes(state, PREFIXES, "an official DETR", drop_suffixes=("num_batches_tracked",))


def detkit_to_official(state: Mapping[str, Any], **opts: Any) -> dict[str, Tensor]:
    """detkit DETR state dict -> official DETR ``model`` state dict (the inverse of :func:`official_to_detkit`)."""
    return rename_prefixes(state, tuple((d, s) for s, d in PREFIXES), "a detkit DETR",
                           drop_suffixes=("num_batches_tracked",))


def looks_official(state: Mapping[str, Any]) -> bool:
    """True for an official DETR state dict (a ResNet body under ``backbone.0.body`` and DETR's query embedding)."""
    return "backbone.0.body.conv1.weight" in state and "query_embed.weight" in state and "class_embed.weight" in state


def looks_detkit(state: Mapping[str, Any]) -> bool:
    """True for a detkit DETR state dict."""
    return "backbone.body.conv1.weight" in state and "head.class_embed.weight" in state


@CHECKPOINT_FORMATS.register("detr")
class DETRFormat(CheckpointFormat):
    """facebookresearch/detr checkpoints (``detr-r50-e632da11.pth``, ...): prefix renaming only."""

    label = "official DETR"
    extra_class_rows = 1  # the no-object row

    def looks_official(self, state: Mapping[str, Any]) -> bool:
        return looks_official(state)

    def looks_detkit(self, state: Mapping[str, Any]) -> bool:
        return looks_detkit(state)

    def to_detkit(self, state: Mapping[str, Any], model_cfg: Mapping[str, Any] | None = None,
                  inference_only: bool | None = None) -> dict[str, Tensor]:
        return official_to_detkit(state)

    def to_official(self, state: Mapping[str, Any], model_cfg: Mapping[str, Any] | None = None,
                    inference_only: bool | None = None) -> dict[str, Tensor]:
        return detkit_to_official(state)
