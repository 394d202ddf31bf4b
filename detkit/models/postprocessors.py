"""Post-processing: raw detector outputs -> per-image scores, labels and absolute xyxy boxes.

This is the one post-processing of detkit: ``detkit eval`` (the evaluator), ``Detector.predict`` and the exported
ONNX graph (``forward_batched``) all run it, so they give the same boxes. Boxes are scaled to the original image and
clipped to it here; the raw ``pred_boxes`` of the model are left as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from detkit.ops.box_ops import box_cxcywh_to_xyxy
from detkit.registry import POSTPROCESSORS

__all__ = ["SoftmaxPostProcessor", "SigmoidTopKPostProcessor", "scale_boxes"]


def scale_boxes(boxes: Tensor, orig_sizes: Tensor, clip: bool = True) -> Tensor:
    """Normalised cxcywh ``boxes (B, K, 4)`` -> absolute xyxy in pixels of ``orig_sizes (B, 2)`` given as (h, w),
    clipped to ``[0, w] x [0, h]`` unless ``clip=False`` (traceable: the bounds are tensors, not Python numbers)."""
    if orig_sizes.shape != (boxes.shape[0], 2):
        raise ValueError(f"orig_sizes must have shape ({boxes.shape[0]}, 2) as (h, w), got {tuple(orig_sizes.shape)}")
    h, w = orig_sizes.to(boxes).unbind(-1)
    scale = torch.stack((w, h, w, h), dim=-1)[:, None, :]
    xyxy = box_cxcywh_to_xyxy(boxes) * scale
    if clip:
        xyxy = torch.minimum(xyxy.clamp(min=0), scale)
    return xyxy


def _at_least_float32(tensor: Tensor) -> Tensor:
    """``tensor`` in float32, or in its own dtype where that is wider (the export check's float64 reference)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _split(scores: Tensor, labels: Tensor, boxes: Tensor) -> list[dict[str, Tensor]]:
    return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]


@POSTPROCESSORS.register("softmax")
class SoftmaxPostProcessor(nn.Module):
    """DETR: softmax over classes, drop the last (no-object) column, best class per query, all queries kept."""

    def forward_batched(self, outputs: Mapping[str, Any], orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``pred_logits (B, Q, C+1)``, ``pred_boxes (B, Q, 4)``, ``orig_sizes (B, 2)`` (h, w) ->
        ``scores (B, Q)``, ``labels (B, Q) int64``, ``boxes (B, Q, 4)`` absolute xyxy clipped to the image."""
        prob = _at_least_float32(outputs["pred_logits"]).softmax(-1)[..., :-1]
        # the best class as a top-1 (= max), so that the export check can see and pin this choice like the others
        scores, labels = prob.topk(1, dim=-1)
        return scores.squeeze(-1), labels.squeeze(-1), scale_boxes(_at_least_float32(outputs["pred_boxes"]), orig_sizes)

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Any], orig_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Per image ``scores (Q,)``, ``labels (Q,) int64``, ``boxes (Q, 4)`` (see :meth:`forward_batched`)."""
        return _split(*self.forward_batched(outputs, orig_sizes))


@POSTPROCESSORS.register("sigmoid_topk")
class SigmoidTopKPostProcessor(nn.Module):
    """LW-DETR: sigmoid over every (query, class) pair, keep the ``num_select`` best pairs.

    A query can appear several times with different labels (box index ``= idx // C``, label ``= idx % C``).

    :param num_select: how many (query, class) pairs to keep per image.
    """

    def __init__(self, num_select: int = 100) -> None:
        super().__init__()
        if num_select < 1:
            raise ValueError(f"num_select must be >= 1, got {num_select}")
        self.num_select = num_select

    def extra_repr(self) -> str:
        return f"num_select={self.num_select}"

    def forward_batched(self, outputs: Mapping[str, Any], orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``pred_logits (B, Q, C)``, ``pred_boxes (B, Q, 4)``, ``orig_sizes (B, 2)`` (h, w) -> ``scores (B, K)``,
        ``labels (B, K) int64``, ``boxes (B, K, 4)`` absolute xyxy clipped to the image, K = min(num_select, Q*C)."""
        logits = _at_least_float32(outputs["pred_logits"])
        num_classes = logits.shape[-1]
        prob = logits.sigmoid().flatten(1)
        k = min(self.num_select, prob.shape[1])
        scores, idx = prob.topk(k, dim=1)
        query = torch.div(idx, num_classes, rounding_mode="floor")
        labels = idx - query * num_classes  # = idx % C, in ops every ONNX runtime has
        boxes = torch.gather(_at_least_float32(outputs["pred_boxes"]), 1, query.unsqueeze(-1).expand(-1, -1, 4))
        return scores, labels, scale_boxes(boxes, orig_sizes)

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Any], orig_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Per image ``scores (K,)``, ``labels (K,) int64``, ``boxes (K, 4)`` (see :meth:`forward_batched`)."""
        return _split(*self.forward_batched(outputs, orig_sizes))
