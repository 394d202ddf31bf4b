"""Box conversions and overlap measures.

Boxes are either ``(cx, cy, w, h)`` ("cxcywh") or ``(x1, y1, x2, y2)`` ("xyxy"), in the last dimension. The pairwise
functions wrap :mod:`torchvision.ops`; the element-wise ones compare box ``i`` of ``a`` with box ``i`` of ``b``.
"""

from __future__ import annotations

import torch
import torchvision.ops as tvops
from torch import Tensor

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_iou",
    "generalized_box_iou",
    "batched_generalized_box_iou",
    "elementwise_box_iou",
    "elementwise_generalized_box_iou",
]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(..., 4)`` cxcywh -> ``(..., 4)`` xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``(..., 4)`` xyxy -> ``(..., 4)`` cxcywh."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of xyxy boxes ``a (N, 4)`` and ``b (M, 4)`` -> ``(N, M)``."""
    return tvops.box_iou(a, b)


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise generalized IoU of xyxy boxes ``a (N, 4)`` and ``b (M, 4)`` -> ``(N, M)``, in [-1, 1]."""
    return tvops.generalized_box_iou(a, b)


def batched_generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise generalized IoU within each batch entry: xyxy ``a (..., N, 4)``, ``b (..., M, 4)`` -> ``(..., N, M)``.

    The same formula as :func:`generalized_box_iou` with leading batch dimensions, so that matching costs for many
    images are computed in one set of tensor ops (only each image's own block, not all images against all targets).
    """
    area_a = ((a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]))[..., :, None]
    area_b = ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]))[..., None, :]
    a_, b_ = a[..., :, None, :], b[..., None, :, :]
    inter_wh = (torch.minimum(a_[..., 2:], b_[..., 2:]) - torch.maximum(a_[..., :2], b_[..., :2])).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area_a + area_b - inter
    hull_wh = (torch.maximum(a_[..., 2:], b_[..., 2:]) - torch.minimum(a_[..., :2], b_[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return inter / union - (hull - union) / hull


def _elementwise_iou_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area_a + area_b - inter
    return inter / union, union


def elementwise_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of ``a[i]`` with ``b[i]`` for xyxy boxes ``a, b (N, 4)`` -> ``(N,)``."""
    return _elementwise_iou_union(a, b)[0]


def elementwise_generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Generalized IoU of ``a[i]`` with ``b[i]`` for xyxy boxes ``a, b (N, 4)`` -> ``(N,)``.

    Like :func:`generalized_box_iou` but only the diagonal, which is what a loss on matched pairs needs (the pairwise
    version costs ``O(N^2)`` memory).
    """
    iou, union = _elementwise_iou_union(a, b)
    lt = torch.minimum(a[:, :2], b[:, :2])
    rb = torch.maximum(a[:, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[:, 0] * wh[:, 1]
    return iou - (hull - union) / hull
