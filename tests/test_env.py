"""The installed torch / torchvision pair works (the trap: a CPU-only torch with the registry's torchvision)."""

import torch
import torchvision
from torchvision.ops import batched_nms, nms, roi_align


def test_torchvision_ops_run():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [0, 1, 2]
    feats = torch.arange(16.0).view(1, 1, 4, 4)
    out = roi_align(feats, [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], output_size=1, aligned=True)
    assert torch.allclose(out.flatten(), feats.mean().flatten())


def test_versions_are_a_pair():
    major_minor = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    tv = tuple(int(x) for x in torchvision.__version__.split("+")[0].split(".")[:2])
    # torchvision 0.N pairs with torch 2.(N-15)
    assert tv[1] - 15 == major_minor[1], (torch.__version__, torchvision.__version__)
