"""Hungarian matcher against brute-force search over every assignment."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from detkit.models.matchers.hungarian import HungarianMatcher


def _giou(a: list[float], b: list[float]) -> float:
    """GIoU of two cxcywh boxes, written out scalar by scalar."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (hull - union) / hull


def _pair_cost(logits: list[float], box: list[float], label: int, tbox: list[float], kind: str,
               weights: tuple[float, float, float]) -> float:
    if kind == "softmax":
        z = [math.exp(v) for v in logits]
        c_cls = -z[label] / sum(z)
    else:
        p = 1 / (1 + math.exp(-logits[label]))
        c_cls = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p**2 * -math.log(1 - p + 1e-8)
    l1 = sum(abs(x - y) for x, y in zip(box, tbox))
    return weights[0] * c_cls + weights[1] * l1 + weights[2] * -_giou(box, tbox)


def _brute_force(logits, boxes, labels, tboxes, kind, weights) -> float:
    """Minimum total cost over all injective maps targets -> queries (or queries -> targets if fewer queries)."""
    q, t = len(logits), len(labels)
    cost = [[_pair_cost(logits[i], boxes[i], labels[j], tboxes[j], kind, weights) for j in range(t)]
            for i in range(q)]
    if t <= q:
        return min(sum(cost[perm[j]][j] for j in range(t)) for perm in itertools.permutations(range(q), t))
    return min(sum(cost[i][perm[i]] for i in range(q)) for perm in itertools.permutations(range(t), q))


def _case(gen: torch.Generator, q: int, sizes: list[int], c: int):
    logits = torch.randn(len(sizes), q, c, generator=gen) * 2
    boxes = torch.rand(len(sizes), q, 4, generator=gen) * 0.5 + 0.1
    targets = [{"labels": torch.randint(0, c - 1, (n,), generator=gen),
                "boxes": torch.rand(n, 4, generator=gen) * 0.5 + 0.1} for n in sizes]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


@pytest.mark.parametrize("kind", ["softmax", "focal"])
def test_matches_brute_force(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    weights = (2.0, 5.0, 2.0) if kind == "focal" else (1.0, 5.0, 2.0)
    matcher = HungarianMatcher(*weights, class_cost=kind)
    for trial in range(6):
        outputs, targets = _case(gen, q=5, sizes=[3, 0, 4, 1, 6][trial % 5: trial % 5 + 2] or [2], c=4)
        indices = matcher(outputs, targets)
        assert len(indices) == len(targets)
        for b, ((qi, ti), tgt) in enumerate(zip(indices, targets)):
            n = len(tgt["labels"])
            assert qi.dtype == torch.int64 and ti.dtype == torch.int64
            assert len(qi) == len(ti) == min(5, n)
            assert len(set(qi.tolist())) == len(qi) and len(set(ti.tolist())) == len(ti)
            if n == 0:
                continue
            logits = outputs["pred_logits"][b].tolist()
            boxes = outputs["pred_boxes"][b].tolist()
            labels = tgt["labels"].tolist()
            tboxes = tgt["boxes"].tolist()
            got = sum(_pair_cost(logits[i], boxes[i], labels[j], tboxes[j], kind, weights)
                      for i, j in zip(qi.tolist(), ti.tolist()))
            best = _brute_force(logits, boxes, labels, tboxes, kind, weights)
            assert got == pytest.approx(best, abs=1e-4)


def test_no_targets_anywhere() -> None:
    outputs = {"pred_logits": torch.randn(2, 4, 3), "pred_boxes": torch.rand(2, 4, 4)}
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    for qi, ti in HungarianMatcher()(outputs, targets):
        assert qi.numel() == 0 and ti.numel() == 0 and qi.dtype == torch.int64


def test_groups_are_matched_independently() -> None:
    gen = torch.Generator().manual_seed(3)
    groups, per_group = 3, 4
    outputs, targets = _case(gen, q=groups * per_group, sizes=[2, 3], c=5)
    matcher = HungarianMatcher(2.0, 5.0, 2.0, class_cost="focal")
    grouped = matcher(outputs, targets, group_detr=groups)
    for b, (qi, ti) in enumerate(grouped):
        n = len(targets[b]["labels"])
        assert len(qi) == n * groups
        for g in range(groups):
            sel = (qi >= g * per_group) & (qi < (g + 1) * per_group)
            assert sorted(ti[sel].tolist()) == list(range(n))  # each GT once per group
            # the same as matching that group's queries alone
            sub = {k: v[b: b + 1, g * per_group: (g + 1) * per_group] for k, v in outputs.items()}
            (q_alone, t_alone), = matcher(sub, [targets[b]])
            assert (qi[sel] - g * per_group).tolist() == q_alone.tolist()
            assert ti[sel].tolist() == t_alone.tolist()
    with pytest.raises(ValueError, match="group"):
        matcher(outputs, targets, group_detr=5)


def test_half_precision_inputs_are_matched_in_fp32() -> None:
    gen = torch.Generator().manual_seed(4)
    outputs, targets = _case(gen, q=6, sizes=[3], c=4)
    ref = HungarianMatcher()(outputs, targets)
    half = HungarianMatcher()({k: v.to(torch.bfloat16) for k, v in outputs.items()}, targets)
    assert len(half[0][0]) == len(ref[0][0]) == 3


NAN, INF = float("nan"), float("inf")
# (class cost, output, value) whose class or box cost is non-finite for the poisoned query; a +inf logit gives the
# focal cost a finite value (p = 1), so it is not a poison there
POISONS = [(kind, key, value) for kind in ("softmax", "focal") for key, value in
           (("pred_logits", NAN), ("pred_logits", INF), ("pred_boxes", NAN), ("pred_boxes", INF))
           if not (kind == "focal" and key == "pred_logits" and value == INF)]


@pytest.mark.parametrize("kind, key, value", POISONS)
def test_non_finite_outputs_are_matched_around_not_a_crash(kind: str, key: str, value: float) -> None:
    """A diverging step's NaN / Inf outputs reach the matcher (the trainer skips the step afterwards): the assignment
    does not fail ("matrix contains invalid numeric entries"), it avoids the poisoned queries where it can, and the
    rest is the optimum over the finite ones."""
    gen = torch.Generator().manual_seed(5)
    weights = (2.0, 5.0, 2.0) if kind == "focal" else (1.0, 5.0, 2.0)
    matcher = HungarianMatcher(*weights, class_cost=kind)
    outputs, targets = _case(gen, q=6, sizes=[3, 4], c=4)
    poisoned = {0: [1, 4], 1: [0]}  # image -> queries
    for b, queries in poisoned.items():
        for q in queries:
            outputs[key][b, q] = value
    indices = matcher(outputs, targets)
    for b, (qi, ti) in enumerate(indices):
        n = len(targets[b]["labels"])
        assert len(qi) == len(ti) == n and sorted(ti.tolist()) == list(range(n))
        assert not set(qi.tolist()) & set(poisoned[b])
        clean = [q for q in range(6) if q not in poisoned[b]]
        logits, boxes = outputs["pred_logits"][b].tolist(), outputs["pred_boxes"][b].tolist()
        labels, tboxes = targets[b]["labels"].tolist(), targets[b]["boxes"].tolist()
        got = sum(_pair_cost(logits[i], boxes[i], labels[j], tboxes[j], kind, weights)
                  for i, j in zip(qi.tolist(), ti.tolist()))
        best = _brute_force([logits[q] for q in clean], [boxes[q] for q in clean], labels, tboxes, kind, weights)
        assert got == pytest.approx(best, abs=1e-4)


@pytest.mark.parametrize("kind", ["softmax", "focal"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_all_non_finite_outputs_still_give_a_full_assignment(kind: str, value: float) -> None:
    gen = torch.Generator().manual_seed(6)
    outputs, targets = _case(gen, q=8, sizes=[3, 0, 5], c=4)
    outputs = {k: torch.full_like(v, value) for k, v in outputs.items()}
    for (qi, ti), t in zip(HungarianMatcher(class_cost=kind)(outputs, targets, group_detr=2), targets):
        n = len(t["labels"])
        matched = min(n, 4)  # 4 queries per group
        assert len(qi) == len(ti) == 2 * matched and qi.dtype == torch.int64
        for g in range(2):  # each group: distinct queries of its own block, distinct targets
            sel = (qi >= 4 * g) & (qi < 4 * (g + 1))
            assert len(set(ti[sel].tolist())) == len(set(qi[sel].tolist())) == matched
