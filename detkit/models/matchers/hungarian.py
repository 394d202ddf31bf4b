"""Hungarian (one-to-one) matching between predictions and ground-truth boxes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import numpy as np
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from detkit.ops.box_ops import batched_generalized_box_iou, box_cxcywh_to_xyxy
from detkit.registry import MATCHERS

__all__ = ["HungarianMatcher"]

# stands in for NaN / +-Inf costs: the assignment needs finite entries, and one this large is never preferred to a
# finite cost (box costs are O(10)); the float64 sums of the solver stay exact enough for thousands of such entries
NON_FINITE_COST = 1e8


@MATCHERS.register("hungarian")
class HungarianMatcher(nn.Module):
    """Optimal assignment of queries to targets (``scipy.optimize.linear_sum_assignment``).

    The cost of assigning query ``q`` to target ``t`` is
    ``cost_class * C_cls + cost_bbox * L1(box_q, box_t) + cost_giou * (-GIoU(box_q, box_t))``, with boxes in
    normalised cxcywh (GIoU computed on xyxy). ``C_cls`` is
      - ``"softmax"`` (DETR): ``-softmax(logits)[q, label_t]`` (the probability, not its log, as the official code);
      - ``"focal"`` (LW-DETR): ``α(1-p)^γ(-log(p+1e-8)) - (1-α)p^γ(-log(1-p+1e-8))`` with ``p = sigmoid(logit)``.

    :param cost_class: weight of the classification cost.
    :param cost_bbox: weight of the L1 box cost.
    :param cost_giou: weight of the negative generalized IoU cost.
    :param class_cost: ``"softmax"`` or ``"focal"``.
    :param focal_alpha: α of the focal class cost.
    :param focal_gamma: γ of the focal class cost.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        class_cost: str = "softmax",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if class_cost not in ("softmax", "focal"):
            raise ValueError(f"class_cost must be 'softmax' or 'focal', got {class_cost!r}")
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0; at least one of cost_class, cost_bbox, cost_giou must be set")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.class_cost = class_cost
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
                f"class_cost={self.class_cost!r}")

    def _class_cost(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``logits (B, Q, C')``, ``labels (B, T)`` -> ``(B, Q, T)``: the class cost of each query for each target."""
        index = labels[:, None, :].expand(-1, logits.shape[1], -1)
        if self.class_cost == "softmax":
            return -logits.softmax(-1).gather(2, index)
        # the focal cost only needs the probabilities of the target classes: gather first, then the element-wise math
        prob = logits.gather(2, index).sigmoid()
        a, g = self.focal_alpha, self.focal_gamma
        pos = a * (1 - prob) ** g * (-(prob + 1e-8).log())
        neg = (1 - a) * prob**g * (-(1 - prob + 1e-8).log())
        return pos - neg

    def cost_matrix(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]]) -> Tensor:
        """Matching costs of every image's queries against its own targets, ``(B, Q, T_max)`` float32 on the outputs'
        device (targets padded to the largest ``T_i``; the padded columns are meaningless)."""
        logits = outputs["pred_logits"].float()
        boxes = outputs["pred_boxes"].float()
        bs = logits.shape[0]
        device = logits.device
        t_max = max(len(t["boxes"]) for t in targets)
        labels = torch.zeros(bs, t_max, dtype=torch.int64, device=device)
        # padding boxes are valid unit boxes so that no NaN appears in the unused columns
        tgt = torch.tensor([0.5, 0.5, 1.0, 1.0], device=device).repeat(bs, t_max, 1)
        for b, t in enumerate(targets):
            n = len(t["boxes"])
            if n:
                labels[b, :n] = t["labels"].to(device=device, dtype=torch.int64)
                tgt[b, :n] = t["boxes"].to(device=device, dtype=torch.float32)
        cost_bbox = torch.cdist(boxes, tgt, p=1)
        cost_giou = -batched_generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt))
        return self.cost_class * self._class_cost(logits, labels) + self.cost_bbox * cost_bbox + \
            self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]], group_detr: int = 1
    ) -> list[tuple[Tensor, Tensor]]:
        """Match each image's queries to its targets.

        The costs of all images and groups are computed in one batched set of tensor ops (only each image's own
        block) and copied to the CPU once; only the assignment runs per image and group. Non-finite costs (NaN or Inf
        outputs) are replaced by :data:`NON_FINITE_COST`, so matching never fails: pairs with finite costs are
        preferred, and the loss of such outputs stays non-finite for the trainer to skip the step.

        :param outputs: ``pred_logits (B, Q, C')`` and ``pred_boxes (B, Q, 4)`` (cxcywh, normalised).
        :param targets: per image, ``labels (T_i,)`` and ``boxes (T_i, 4)`` (cxcywh, normalised).
        :param group_detr: the ``Q`` queries form ``group_detr`` consecutive blocks matched independently.
        :returns: per image ``(query_idx, target_idx)``, int64 tensors of equal length ``min(Q, T_i) * groups``,
            query indices into ``0..Q-1`` sorted ascending within each group.
        """
        bs, num_queries = outputs["pred_logits"].shape[:2]
        if num_queries % group_detr:
            raise ValueError(f"{num_queries} queries cannot be split into group_detr={group_detr} equal groups")
        sizes = [len(t["boxes"]) for t in targets]
        if len(sizes) != bs:
            raise ValueError(f"{bs} images in the outputs but {len(sizes)} target dicts")
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty.clone()) for _ in range(bs)]

        # a diverging step (NaN / Inf in the outputs) must not crash the assignment: its loss stays non-finite and the
        # trainer skips the step; replacing the bad costs is one element-wise op on the device, no extra host sync
        cost = self.cost_matrix(outputs, targets)
        cost = torch.nan_to_num(cost, nan=NON_FINITE_COST, posinf=NON_FINITE_COST, neginf=NON_FINITE_COST)
        cost = cost.cpu().numpy()
        per_group = num_queries // group_detr
        indices: list[tuple[Tensor, Tensor]] = []
        for b, size in enumerate(sizes):
            if size == 0:
                indices.append((empty, empty.clone()))
                continue
            rows, cols = [], []
            for g in range(group_detr):
                r, c = linear_sum_assignment(cost[b, g * per_group : (g + 1) * per_group, :size])
                rows.append(r + g * per_group)
                cols.append(c)
            indices.append((torch.from_numpy(np.concatenate(rows)).to(torch.int64),
                            torch.from_numpy(np.concatenate(cols)).to(torch.int64)))
        return indices
