"""DETR's set prediction loss: Hungarian matching, then cross-entropy, L1 and GIoU on matched pairs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from detkit.ops.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from detkit.registry import LOSSES

__all__ = ["SetCriterion", "average_num_boxes"]

_DEFAULT_WEIGHTS = {"ce": 1.0, "bbox": 5.0, "giou": 2.0}


def average_num_boxes(targets: Sequence[Mapping[str, Any]], device: torch.device, factor: int = 1) -> Tensor:
    """Number of target boxes (times ``factor``) averaged over processes, at least 1 (a 0-dim float tensor)."""
    num = torch.tensor(float(sum(len(t["labels"]) for t in targets) * factor), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num)
        num = num / dist.get_world_size()
    return num.clamp(min=1)


def _average_over_processes(values: list[float], device: torch.device) -> Tensor:
    """``values`` averaged over processes, one all-reduce (a float tensor of ``len(values)``)."""
    out = torch.tensor(values, dtype=torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(out)
        out = out / dist.get_world_size()
    return out


@LOSSES.register("set_criterion")
class SetCriterion(nn.Module):
    """The DETR loss.

    For the final outputs and each entry of ``aux_outputs`` (own matching each, key suffix ``_{i}``):
      - ``loss_ce``: cross-entropy over ``num_classes + 1`` classes for every query (unmatched queries target the
        no-object class, weighted ``eos_coef``), a weighted mean over queries; under DDP the mean over the queries of
        all processes (its class-weight total averaged over processes, like ``num_boxes``), so that N processes
        compute the gradient of one process on the global batch (the official code takes each process's own mean,
        which differs when the processes' images hold different numbers of objects; one process: the same);
      - ``loss_bbox``: L1 of matched cxcywh boxes, summed, divided by ``num_boxes``;
      - ``loss_giou``: ``1 - GIoU`` of matched boxes, summed, divided by ``num_boxes``.
    Each ``loss_*`` is returned already multiplied by its weight; ``loss`` is their sum. ``class_error`` (top-1 error
    of matched queries, %) and ``cardinality_error`` (L1 between the number of non-no-object predictions and of
    targets) are logged only, detached. ``num_boxes`` is averaged over processes when distributed.

    :param num_classes: number of object classes, without no-object (injected by the recipe).
    :param matcher: the matching module (injected by the recipe).
    :param eos_coef: class weight of the no-object class.
    :param weights: ``{ce, bbox, giou}`` loss weights.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        eos_coef: float = 0.1,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        weights = dict(_DEFAULT_WEIGHTS if weights is None else weights)
        unknown = set(weights) - set(_DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown loss weight(s) {sorted(unknown)}; expected keys {sorted(_DEFAULT_WEIGHTS)}")
        self.weights = {**_DEFAULT_WEIGHTS, **weights}
        self.num_classes = num_classes
        self.matcher = matcher
        self.eos_coef = eos_coef
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, weights={self.weights}"

    def _class_weight_total(self, num_queries: int, batch: int, matched: int) -> float:
        """Sum of the cross-entropy's class weights over the ``batch * num_queries`` queries when ``matched`` of them
        have an object class (weight 1) and the rest no-object (weight ``eos_coef``)."""
        return float(matched + (batch * num_queries - matched) * self.eos_coef)

    def _single(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Any]], num_boxes: Tensor,
                log: bool, class_weight_total: Tensor | None = None) -> dict[str, Tensor]:
        """Unweighted losses of one set of predictions. ``class_weight_total``: the normaliser of the weighted
        cross-entropy (the process average of :meth:`_class_weight_total` for a one-to-one matching), or None for
        this process's own weight sum."""
        logits = outputs["pred_logits"]
        indices = self.matcher(outputs, targets)
        if class_weight_total is not None and sum(len(q) for q, _ in indices) != \
                sum(min(logits.shape[1], len(t["labels"])) for t in targets):
            class_weight_total = None  # not a one-to-one matching: this process's own weighted mean
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(logits.device)
        query_idx = torch.cat([q for q, _ in indices]).to(logits.device)
        matched_labels = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)])
        matched_labels = matched_labels.to(logits.device, torch.int64)

        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, query_idx] = matched_labels
        weight = self.empty_weight.to(logits.device)
        if class_weight_total is None:
            loss_ce = F.cross_entropy(logits.float().transpose(1, 2), target_classes, weight=weight)
        else:
            loss_ce = F.cross_entropy(logits.float().transpose(1, 2), target_classes, weight=weight,
                                      reduction="sum") / class_weight_total

        src_boxes = outputs["pred_boxes"][batch_idx, query_idx].float()
        tgt_boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)])
        tgt_boxes = tgt_boxes.to(src_boxes)
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        loss_giou = (1 - giou).sum() / num_boxes

        out = {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        if log:
            with torch.no_grad():
                matched_logits = logits[batch_idx, query_idx]
                if len(matched_labels):
                    acc = (matched_logits.argmax(-1) == matched_labels).float().mean() * 100
                else:
                    acc = torch.zeros((), device=logits.device)
                out["class_error"] = 100 - acc
                num_pred = (logits.argmax(-1) != self.num_classes).sum(1).float()
                num_tgt = torch.tensor([float(len(t["labels"])) for t in targets], device=logits.device)
                out["cardinality_error"] = F.l1_loss(num_pred, num_tgt)
        return out

    def forward(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        """``outputs``: ``pred_logits (B, Q, C+1)``, ``pred_boxes (B, Q, 4)``, optional ``aux_outputs``;
        ``targets``: per image ``labels (T,)``, ``boxes (T, 4)`` normalised cxcywh. Returns the weighted loss dict."""
        logits = outputs["pred_logits"]
        batch, num_queries = logits.shape[:2]
        # every decoder layer matches min(Q, T_i) queries per image: one class-weight total for all of them, averaged
        # over processes in the same all-reduce as the box count
        matched = sum(min(num_queries, len(t["labels"])) for t in targets)
        num_boxes, class_weight_total = _average_over_processes(
            [float(sum(len(t["labels"]) for t in targets)), self._class_weight_total(num_queries, batch, matched)],
            logits.device).unbind()
        num_boxes = num_boxes.clamp(min=1)
        raw = self._single(outputs, targets, num_boxes, log=True, class_weight_total=class_weight_total)
        for i, aux in enumerate(outputs.get("aux_outputs", ())):
            same = aux["pred_logits"].shape[:2] == (batch, num_queries)
            raw.update({f"{k}_{i}": v for k, v in self._single(aux, targets, num_boxes, log=False,
                                                                 class_weight_total=class_weight_total if same
                                                                 else None).items()})

        losses: dict[str, Tensor] = {}
        for key, value in raw.items():
            if key.startswith("loss_"):
                base = key[len("loss_"):].split("_")[0]
                losses[key] = value * self.weights[base]
            else:
                losses[key] = value.detach()
        losses["loss"] = sum(v for k, v in losses.items() if k.startswith("loss_"))  # type: ignore[assignment]
        return losses
