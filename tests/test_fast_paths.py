"""Fast paths keep the numerics: BN folding / channels-last (``optimize_for_inference``), the batched matcher costs."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision.ops as tvops
from torchvision.ops import FrozenBatchNorm2d

from detkit import build_model, compose
from detkit.models.backbones.resnet import ResNet
from detkit.models.fuse import fold_batch_norms, optimize_for_inference
from detkit.models.matchers.hungarian import HungarianMatcher
from detkit.ops.box_ops import batched_generalized_box_iou, box_cxcywh_to_xyxy
from tests.test_compile import DETR_SMALL, LWDETR_SMALL
from tests.conftest import CONFIGS


def _randomize_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every batch norm non-trivial statistics and affine parameters (fresh ones are the identity map)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
                n = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)


def _build(config: str, overrides: list[str]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(compose(CONFIGS / config, overrides).model).eval()
    _randomize_norms(model)
    return model


@pytest.mark.parametrize("depth", [18, 50])
def test_fold_batch_norms_resnet(depth: int) -> None:
    torch.manual_seed(0)
    net = ResNet(depth, return_layers=["layer2", "layer4"]).eval()
    _randomize_norms(net)
    fast = copy.deepcopy(net)
    folded = fold_batch_norms(fast)
    num_norms = sum(isinstance(m, FrozenBatchNorm2d) for m in net.modules())
    assert folded == num_norms and not any(isinstance(m, FrozenBatchNorm2d) for m in fast.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(net(x), fast.to(memory_format=torch.channels_last)(x)):
            scale = a.abs().max()
            assert (a - b).abs().max() <= 1e-5 * scale, float((a - b).abs().max() / scale)


def test_training_batch_norm_is_not_folded() -> None:
    seq = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    assert fold_batch_norms(seq) == 0
    assert fold_batch_norms(seq.eval()) == 1 and isinstance(seq[1], torch.nn.Identity)


@pytest.mark.parametrize(("config", "overrides", "size"), [
    ("detr_r50.yaml", DETR_SMALL, (96, 128)),
    ("lwdetr_tiny_coco.yaml", LWDETR_SMALL, (128, 192)),
], ids=["detr", "lwdetr"])
def test_optimize_for_inference_matches_plain_model(config, overrides, size) -> None:
    model = _build(config, overrides)
    plain_state = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize_for_inference(copy.deepcopy(model))
    # the original model (training / checkpoint layout) is untouched; the copy has folded convs
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in plain_state.items()}
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)) for m in fast.modules())
    h, w = size
    images = torch.randn(2, 3, h, w)
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    mask[1, h // 2:, :] = True
    with torch.no_grad():
        ref, out = model(images, mask), fast(images, mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-4)


def test_batched_generalized_box_iou_equals_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    a = box_cxcywh_to_xyxy(torch.rand(3, 7, 4, generator=g) * 0.5 + 0.1)
    b = box_cxcywh_to_xyxy(torch.rand(3, 5, 4, generator=g) * 0.5 + 0.1)
    got = batched_generalized_box_iou(a, b)
    for i in range(3):
        torch.testing.assert_close(got[i], tvops.generalized_box_iou(a[i], b[i]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["softmax", "focal"])
def test_batched_matcher_costs_equal_per_image_costs(kind: str) -> None:
    """The matcher's padded (B, Q, T_max) costs equal the per-image formula computed independently."""
    g = torch.Generator().manual_seed(1)
    matcher = HungarianMatcher(2.0, 5.0, 2.0, class_cost=kind)
    logits = torch.randn(3, 8, 6, generator=g)
    boxes = torch.rand(3, 8, 4, generator=g) * 0.4 + 0.1
    sizes = [4, 0, 2]
    targets = [{"labels": torch.randint(0, 5, (n,), generator=g), "boxes": torch.rand(n, 4, generator=g) * 0.4 + 0.1}
               for n in sizes]
    cost = matcher.cost_matrix({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert cost.shape == (3, 8, 4)
    for b, (t, n) in enumerate(zip(targets, sizes)):
        if n == 0:
            continue
        if kind == "softmax":
            c_cls = -logits[b].softmax(-1)[:, t["labels"]]
        else:
            p = logits[b].sigmoid()[:, t["labels"]]
            c_cls = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log() - 0.75 * p**2 * -(1 - p + 1e-8).log()
        l1 = (boxes[b][:, None] - t["boxes"][None]).abs().sum(-1)
        giou = tvops.generalized_box_iou(box_cxcywh_to_xyxy(boxes[b]), box_cxcywh_to_xyxy(t["boxes"]))
        torch.testing.assert_close(cost[b, :, :n], 2 * c_cls + 5 * l1 - 2 * giou, rtol=0, atol=1e-5)
    indices = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets, group_detr=2)
    assert [len(q) for q, _ in indices] == [8, 0, 4]


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_fused_frozen_bn_equals_torchvision_in_training(depth: int) -> None:
    """The on-the-fly frozen-BN folding and channels-last layout give torchvision's outputs and gradients (in float64,
    where rounding cannot hide a difference in the math; float32 differs by rounding only)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    torch.manual_seed(0)
    net = ResNet(depth, frozen_stages=1, return_layers=["layer3", "layer4"]).train()
    _randomize_norms(net)
    net.double()
    ref = copy.deepcopy(net)
    for m in ref.modules():  # back to torchvision's own blocks, NCHW, BN applied after each conv
        if isinstance(m, Bottleneck):
            m.__class__ = Bottleneck
        elif isinstance(m, BasicBlock):
            m.__class__ = BasicBlock
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    outs, ref_outs = net(x), list(ref.body(x).values())
    loss, ref_loss = sum(o.square().mean() for o in outs), sum(o.square().mean() for o in ref_outs)
    loss.backward()
    ref_loss.backward()
    for a, b in zip(outs, ref_outs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * float(b.detach().abs().max()))
    grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and any("layer2" in n for n in grads)
    assert not any(n.startswith(("body.conv1", "body.layer1")) for n in grads)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=0, atol=1e-10 * float(ref_grads[n].abs().max()))


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_inference_kernels_equal_torchvision(depth: int) -> None:
    """CPU inference runs each conv (+ residual add) (+ ReLU) as one oneDNN kernel, BN folded; the result equals
    torchvision's plain blocks (the reference path: BN applied after each conv, NCHW)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from detkit.models.backbones import resnet

    torch.manual_seed(0)
    net = ResNet(depth, return_layers=["layer2", "layer4"], dilation=depth >= 50).eval()
    _randomize_norms(net)
    ref = copy.deepcopy(net)
    for m in ref.modules():
        if isinstance(m, Bottleneck):
            m.__class__ = Bottleneck
        elif isinstance(m, BasicBlock):
            m.__class__ = BasicBlock
    x = torch.randn(2, 3, 96, 128)
    with torch.inference_mode():
        assert resnet._mkldnn_fusion_applies(x), "the fused CPU inference path is off on this build"
        outs, ref_outs = net(x), list(ref.body(x).values())
    for a, b in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))
    with torch.enable_grad():
        assert not resnet._mkldnn_fusion_applies(x)  # autograd takes the ordinary (in-place) ops


def test_resnet_trains_under_bf16_autocast() -> None:
    """Training under autocast takes the plain folded conv (a custom autograd Function would lose the autocast
    state in its backward); gradients reach every trainable layer and follow the fp32 ones."""
    torch.manual_seed(0)
    net = ResNet(18, frozen_stages=1, return_layers=["layer4"]).train()
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)[0]
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    assert grads.keys() == {n for n, p in net.named_parameters() if p.requires_grad}
    net.zero_grad()
    net(x)[0].square().mean().backward()
    for n, g in grads.items():
        cos = torch.nn.functional.cosine_similarity(g.flatten(), net.get_parameter(n).grad.flatten(), dim=0)
        assert cos > 0.9, (n, float(cos))


def _graph_nodes(t: torch.Tensor) -> set[str]:
    """Names of every autograd node behind ``t``."""
    seen, names, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def test_mlp_in_place_relu_keeps_values_and_gradients_without_copy_slices() -> None:
    """The MLP's in-place ReLU runs on a fresh product, never on ``F.linear``'s 3-D view (whose backward would
    zero-fill, clone and scatter the whole gradient); values and gradients equal the out-of-place formulation."""
    from detkit.models.layers import MLP

    torch.manual_seed(0)
    mlp = MLP(8, 16, 4, num_layers=3)
    x = torch.randn(2, 5, 8, requires_grad=True)
    out = mlp(x)
    assert out.shape == (2, 5, 4)
    assert "CopySlices" not in _graph_nodes(out)
    ref_x = x.detach().clone().requires_grad_()
    ref = ref_x
    for i, layer in enumerate(mlp.layers):
        ref = layer(ref)
        ref = torch.relu(ref) if i < 2 else ref
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), [x, *mlp.parameters()])
    ref_grads = torch.autograd.grad(ref.square().sum(), [ref_x, *mlp.parameters()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
