"""LW-DETR set criterion: IoU-aware BCE classification + L1 + GIoU, on the final, auxiliary and two-stage outputs.

IA-BCE (as the official ``ia_bce_loss``), with ``s = sigmoid(logit)``:

- at each matched (query, target class) pair the target is ``t = clamp(s^α * IoU^(1-α), min=0.01)`` (detached, IoU of
  the detached predicted box with its target) and the loss ``-t log s - (1-t) log(1-s)``;
- every other (query, class) entry is a negative with loss ``-s² log(1-s)`` (the weight ``s²`` is *not* detached,
  as in the official code);
- summed and divided by ``num_boxes``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from detkit.models.losses.set_criterion import average_num_boxes
from detkit.ops.box_ops import box_cxcywh_to_xyxy, elementwise_box_iou, elementwise_generalized_box_iou
from detkit.ops.precision import at_least_float32
from detkit.registry import LOSSES

__all__ = ["ia_bce_loss", "LWDETRCriterion"]


def ia_bce_loss(
    logits: Tensor, pos_index: tuple[Tensor, Tensor, Tensor], ious: Tensor, num_boxes: Tensor | float,
    alpha: float = 0.25, gamma: float = 2.0,
) -> Tensor:
    """IoU-aware BCE.

    :param logits: ``(B, Q, C)``.
    :param pos_index: ``(batch_idx, query_idx, class_idx)`` of the ``M`` positive entries.
    :param ious: ``(M,)`` IoU of each positive's predicted box with its target.
    :param num_boxes: normaliser.
    :returns: scalar loss (float32, or wider: low-precision logits are cast up first).
    """
    logits = at_least_float32(logits)
    prob = logits.sigmoid()
    pos_weights = torch.zeros_like(logits)
    neg_weights = prob**gamma
    t = (prob[pos_index].detach().pow(alpha) * ious.detach().pow(1 - alpha)).clamp(min=0.01)
    pos_weights = pos_weights.index_put(pos_index, t.to(logits.dtype))
    neg_weights = neg_weights.index_put(pos_index, (1 - t).to(logits.dtype))
    # -w_pos log s - w_neg log(1-s), with log(1-s) = logsigmoid(x) - x
    loss = neg_weights * logits - F.logsigmoid(logits) * (pos_weights + neg_weights)
    return loss.sum() / num_boxes


@LOSSES.register("ia_bce")
class LWDETRCriterion(nn.Module):
    """Hungarian-matched LW-DETR losses, already weighted.

    ``forward(outputs, targets) -> dict``: ``loss_ce``, ``loss_bbox``, ``loss_giou`` for the last decoder layer, the
    same with suffix ``_{i}`` for each entry of ``aux_outputs`` and ``_enc`` for ``enc_outputs`` (each matched on its
    own), ``loss`` (their sum) and ``class_error`` (logged only). During training the queries form ``group_detr``
    groups matched independently and ``num_boxes = #targets * group_detr``.

    :param matcher: the matcher (injected), called as ``matcher(outputs, targets, group_detr=G)``.
    :param num_classes: number of sigmoid classes (injected).
    :param group_detr: query groups during training (injected).
    :param alpha: α of IA-BCE (the official ``focal_alpha``).
    :param gamma: exponent of the negative weight ``s^γ``.
    :param weights: weights of ``cls``, ``bbox`` and ``giou``.
    """

    def __init__(
        self,
        matcher: nn.Module,
        num_classes: int = 91,
        group_detr: int = 13,
        alpha: float = 0.25,
        gamma: float = 2.0,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        weights = dict(weights or {})
        unknown = set(weights) - {"cls", "bbox", "giou"}
        if unknown:
            raise ValueError(f"unknown loss weight(s) {sorted(unknown)}; expected cls, bbox, giou")
        self.matcher = matcher
        self.num_classes = num_classes
        self.group_detr = group_detr
        self.alpha = alpha
        self.gamma = gamma
        self.weights = {"cls": 1.0, "bbox": 5.0, "giou": 2.0, **weights}

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, group_detr={self.group_detr}, weights={self.weights}"

    def _single(
        self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Any]], groups: int,
        num_boxes: Tensor | float,
    ) -> dict[str, Tensor]:
        # float32 even when called on autocast outputs directly (the trainer casts them before the criterion)
        logits, boxes = at_least_float32(outputs["pred_logits"]), at_least_float32(outputs["pred_boxes"])
        device = logits.device
        indices = self.matcher(outputs, targets, group_detr=groups)
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(device)
        query_idx = torch.cat([q for q, _ in indices]).to(device)
        tgt_labels = torch.cat([t["labels"].to(device)[j.to(device)] for t, (_, j) in zip(targets, indices)])
        tgt_boxes = torch.cat([t["boxes"].to(device)[j.to(device)] for t, (_, j) in zip(targets, indices)])
        src_boxes = boxes[batch_idx, query_idx]
        src_xyxy, tgt_xyxy = box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes)
        ious = elementwise_box_iou(src_xyxy.detach(), tgt_xyxy)
        loss_ce = ia_bce_loss(logits, (batch_idx, query_idx, tgt_labels), ious, num_boxes, self.alpha, self.gamma)
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
        loss_giou = (1 - elementwise_generalized_box_iou(src_xyxy, tgt_xyxy)).sum() / num_boxes
        with torch.no_grad():
            if len(tgt_labels):
                acc = (logits[batch_idx, query_idx].argmax(-1) == tgt_labels).float().mean() * 100
            else:
                acc = torch.tensor(100.0, device=device)
        return {
            "loss_ce": self.weights["cls"] * loss_ce,
            "loss_bbox": self.weights["bbox"] * loss_bbox,
            "loss_giou": self.weights["giou"] * loss_giou,
            "class_error": (100 - acc).detach(),
        }

    def forward(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        """``outputs`` of the LW-DETR detector and per-image ``targets`` (``labels``, ``boxes`` cxcywh) -> losses."""
        groups = self.group_detr if self.training else 1
        num_boxes = average_num_boxes(targets, outputs["pred_logits"].device, groups)  # a tensor: no host sync
        losses = self._single(outputs, targets, groups, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self._single(aux, targets, groups, num_boxes).items()
                           if k.startswith("loss_")})
        if "enc_outputs" in outputs:
            enc = self._single(outputs["enc_outputs"], targets, groups, num_boxes)
            losses.update({f"{k}_enc": v for k, v in enc.items() if k.startswith("loss_")})
        losses["loss"] = sum(v for k, v in losses.items() if k.startswith("loss_"))
        return losses
