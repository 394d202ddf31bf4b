"""Box conversions and IoU measures against torchvision and hand-computed values."""

from __future__ import annotations

import torch
import torchvision.ops as tvops

from detkit.ops import box_ops


def _random_xyxy(n: int, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * 10
    wh = torch.rand(n, 2, generator=gen) * 5 + 0.1
    return torch.cat((xy, xy + wh), dim=1)


def test_conversions_round_trip_and_values() -> None:
    cxcywh = torch.tensor([[5.0, 4.0, 2.0, 6.0]])
    xyxy = box_ops.box_cxcywh_to_xyxy(cxcywh)
    assert xyxy.tolist() == [[4.0, 1.0, 6.0, 7.0]]
    assert box_ops.box_xyxy_to_cxcywh(xyxy).tolist() == cxcywh.tolist()
    gen = torch.Generator().manual_seed(0)
    boxes = _random_xyxy(20, gen)
    back = box_ops.box_cxcywh_to_xyxy(box_ops.box_xyxy_to_cxcywh(boxes))
    torch.testing.assert_close(back, boxes)
    torch.testing.assert_close(box_ops.box_xyxy_to_cxcywh(boxes), tvops.box_convert(boxes, "xyxy", "cxcywh"))
    # batched leading dims work too
    assert box_ops.box_cxcywh_to_xyxy(torch.rand(2, 3, 4)).shape == (2, 3, 4)


def test_pairwise_against_torchvision() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = _random_xyxy(7, gen), _random_xyxy(5, gen)
    torch.testing.assert_close(box_ops.box_iou(a, b), tvops.box_iou(a, b))
    torch.testing.assert_close(box_ops.generalized_box_iou(a, b), tvops.generalized_box_iou(a, b))


def test_elementwise_equals_diagonal_of_torchvision() -> None:
    gen = torch.Generator().manual_seed(2)
    a, b = _random_xyxy(30, gen), _random_xyxy(30, gen)
    b[:5] = a[:5]  # identical pairs
    torch.testing.assert_close(box_ops.elementwise_box_iou(a, b), tvops.box_iou(a, b).diagonal())
    giou = box_ops.elementwise_generalized_box_iou(a, b)
    torch.testing.assert_close(giou, tvops.generalized_box_iou(a, b).diagonal())
    torch.testing.assert_close(giou[:5], torch.ones(5))


def test_hand_computed_giou() -> None:
    # [0,0,2,2] vs [1,1,3,3]: inter 1, union 7, hull 9 -> IoU 1/7, GIoU 1/7 - 2/9
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    assert abs(box_ops.elementwise_box_iou(a, b).item() - 1 / 7) < 1e-6
    assert abs(box_ops.elementwise_generalized_box_iou(a, b).item() - (1 / 7 - 2 / 9)) < 1e-6
    # disjoint: [0,0,1,1] vs [2,0,3,1]: IoU 0, union 2, hull 3 -> GIoU -1/3
    c = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    d = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert abs(box_ops.elementwise_generalized_box_iou(d, c).item() + 1 / 3) < 1e-6
    assert abs(box_ops.generalized_box_iou(d, c).item() + 1 / 3) < 1e-6
