"""torchvision ResNet with frozen batch norm, as the DETR backbone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from detkit.errors import ConfigError
from detkit.registry import BACKBONES, did_you_mean

__all__ = ["ResNet", "conv_bn_act", "conv_frozen_bn"]


def _frozen_bn_affine(bn: FrozenBatchNorm2d) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` per channel of a frozen BN: ``bn(y) == y * scale + shift``."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    return scale, bn.bias - bn.running_mean * scale


def _folded_params(conv: nn.Conv2d, bn: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """Weight and bias of ``bn(conv(.))`` as one convolution, or ``None`` when ``bn`` is not a fixed affine map."""
    if isinstance(bn, nn.Identity):
        return conv.weight, conv.bias
    if not isinstance(bn, FrozenBatchNorm2d):
        return None
    scale, shift = _frozen_bn_affine(bn)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return conv.weight * scale.view(-1, 1, 1, 1), bias


class _FoldedConv(torch.autograd.Function):
    """``conv2d(x, W * s, t)`` whose backward recomputes ``W * s`` instead of keeping it: autograd would otherwise hold
    one folded copy of every trainable convolution's weight (about 90 MB for a ResNet-50) from forward to backward.
    Gradients flow to ``x`` and ``W`` (a frozen BN's ``s`` and ``t`` are constants)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, stride: tuple[int, ...],
                padding: tuple[int, ...], dilation: tuple[int, ...], groups: int) -> Tensor:
        ctx.save_for_backward(x, weight, scale)
        ctx.geometry = (stride, padding, dilation, groups)
        return F.conv2d(x, weight * scale.view(-1, 1, 1, 1), shift, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, scale = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_out, x, weight * scale.view(-1, 1, 1, 1), None, list(stride), list(padding), list(dilation), False,
            [0] * len(padding), groups, [need_x, need_w, False],
        )
        if grad_w is not None:
            grad_w = grad_w * scale.view(-1, 1, 1, 1)
        return grad_x, grad_w, None, None, None, None, None, None


def conv_frozen_bn(conv: nn.Conv2d, bn: nn.Module, x: Tensor) -> Tensor:
    """``bn(conv(x))`` with a :class:`FrozenBatchNorm2d` folded into the convolution on the fly.

    A frozen BN is a fixed per-channel affine map ``y * s + t``, so ``conv(x, W) * s + t == conv(x, W * s) + t``: the
    same function and the same gradients for ``W`` (through ``W * s``), without the two element-wise passes (and
    their backward) over the activation. The state dict is untouched. Any other ``bn`` (e.g. ``nn.Identity`` after
    :func:`detkit.models.fuse.fold_batch_norms`) is applied as usual.
    """
    if not isinstance(bn, FrozenBatchNorm2d):
        return bn(conv(x))
    if (torch.is_grad_enabled() and conv.bias is None and conv.weight.requires_grad
            and not torch.is_autocast_enabled(x.device.type)  # the Function's backward would not see the autocast
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()):
        scale, shift = _frozen_bn_affine(bn)
        return _FoldedConv.apply(x, conv.weight, scale, shift, conv.stride, conv.padding, conv.dilation, conv.groups)
    weight, bias = _folded_params(conv, bn)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


_HAS_MKLDNN_FUSION = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _mkldnn_fusion_applies(x: Tensor) -> bool:
    """oneDNN's fused conv (+ add) (+ ReLU) kernels: CPU float32 inference in plain eager mode only (autograd, tracing,
    ONNX export and ``torch.compile`` see the ordinary ops; inductor fuses on its own)."""
    return (
        _HAS_MKLDNN_FUSION
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch.onnx.is_in_onnx_export()
    )


def conv_bn_act(conv: nn.Conv2d, bn: nn.Module, x: Tensor, relu: bool = True, residual: Tensor | None = None) -> Tensor:
    """``relu(bn(conv(x)) + residual)`` (ReLU and residual optional), frozen BN folded into the convolution.

    In CPU inference the whole expression is one oneDNN kernel (convolution with ``add`` / ``relu`` post-ops); otherwise
    the add and ReLU run in place on the convolution's fresh output, as torchvision's blocks do (autograd-safe: neither
    a convolution's nor an addition's backward needs that output), which avoids allocating (and, for large maps,
    page-faulting) one more activation-sized buffer per step.
    """
    if _mkldnn_fusion_applies(x):
        params = _folded_params(conv, bn)
        if params is not None:
            w, b = params
            geom = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
            act = "relu" if relu else "none"
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(x, w, b, *geom, act, [], "")
            return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, w, b, *geom, "add", 1.0, act, [], "")
    out = conv_frozen_bn(conv, bn, x)
    if residual is not None:
        out = out.add_(residual)
    return out.relu_() if relu else out


class _FusedBottleneck(Bottleneck):
    """torchvision's ``Bottleneck`` (same modules and keys) computed with :func:`conv_bn_act`."""

    def forward(self, x: Tensor) -> Tensor:
        out = conv_bn_act(self.conv1, self.bn1, x)
        out = conv_bn_act(self.conv2, self.bn2, out)
        identity = x if self.downsample is None else conv_bn_act(self.downsample[0], self.downsample[1], x, relu=False)
        return conv_bn_act(self.conv3, self.bn3, out, residual=identity)


class _FusedBasicBlock(BasicBlock):
    """torchvision's ``BasicBlock`` (same modules and keys) computed with :func:`conv_bn_act`."""

    def forward(self, x: Tensor) -> Tensor:
        out = conv_bn_act(self.conv1, self.bn1, x)
        identity = x if self.downsample is None else conv_bn_act(self.downsample[0], self.downsample[1], x, relu=False)
        return conv_bn_act(self.conv2, self.bn2, out, residual=identity)


_DEPTHS = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101", 152: "resnet152"}
_STAGES = ("layer1", "layer2", "layer3", "layer4")


@BACKBONES.register("resnet")
class ResNet(nn.Module):
    """A torchvision ResNet (v1.5) body with :class:`~torchvision.ops.FrozenBatchNorm2d`, returning chosen stages.

    State-dict keys are ``body.conv1.weight``, ``body.layer1.0.bn1.running_mean``, ... (the official DETR keys
    without the ``backbone.0.`` prefix). No weights are loaded here.

    :param depth: 18, 34, 50, 101 or 152.
    :param frozen_stages: ``-1`` trains everything, ``0`` freezes the stem (``conv1``; its BN is always frozen),
        ``k >= 1`` the stem and ``layer1..layer{k}``. The official DETR trains ``layer2..4`` only (``1``).
    :param dilation: replace the stride of ``layer4`` by dilation (DC5: output stride 16 instead of 32).
    :param return_layers: stages to return, a subset of ``layer1..layer4``, in order.
    :param channels_last: run the convolutions in channels-last (NHWC) layout, which oneDNN and cuDNN compute faster;
        only the activations' memory layout changes (parameters, state dict and results are the same).

    Each frozen batch norm is folded into its convolution on the fly (:func:`conv_frozen_bn`), in training too: the
    same function and gradients, fewer passes over the activations.
    """

    def __init__(
        self,
        depth: int = 50,
        frozen_stages: int = 1,
        dilation: bool = False,
        return_layers: Sequence[str] = ("layer4",),
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if depth not in _DEPTHS:
            raise ValueError(f"resnet depth must be one of {sorted(_DEPTHS)}, got {depth}")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in -1..4, got {frozen_stages}")
        return_layers = list(return_layers)
        unknown = [name for name in return_layers if name not in _STAGES]
        if unknown or not return_layers:
            raise ValueError(f"return_layers must be a non-empty subset of {list(_STAGES)}, got {return_layers}")
        return_layers = sorted(return_layers, key=_STAGES.index)
        if dilation and depth < 50:
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet (depth >= 50), got depth={depth}")

        net = getattr(torchvision.models, _DEPTHS[depth])(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=FrozenBatchNorm2d
        )
        for block in net.modules():
            if type(block) is Bottleneck:
                block.__class__ = _FusedBottleneck
            elif type(block) is BasicBlock:
                block.__class__ = _FusedBasicBlock
        self.body = IntermediateLayerGetter(net, return_layers={name: name for name in return_layers})
        self.channels_last = channels_last
        self.depth = depth
        self.frozen_stages = frozen_stages
        self.dilation = dilation
        self.return_layers = return_layers

        expansion = 4 if depth >= 50 else 1
        channels = {name: 64 * 2**i * expansion for i, name in enumerate(_STAGES)}
        strides = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 16 if dilation else 32}
        self.out_channels: list[int] = [channels[name] for name in return_layers]
        self.strides: list[int] = [strides[name] for name in return_layers]

        frozen = ["conv1", "bn1", *_STAGES[: max(frozen_stages, 0)]] if frozen_stages >= 0 else []
        for name, param in self.body.named_parameters():
            if name.split(".")[0] in frozen:
                param.requires_grad_(False)

    def extra_repr(self) -> str:
        return (f"depth={self.depth}, frozen_stages={self.frozen_stages}, dilation={self.dilation}, "
                f"return_layers={self.return_layers}")

    def pretrained_source(self, weights: str, file: str | None) -> dict[str, Any] | None:
        """Named weights (``model.backbone.weights``, see :mod:`detkit.weights.apply`): a member of torchvision's
        weights enum for this depth (``IMAGENET1K_V1``, ``DEFAULT``, ``ResNet50_Weights.IMAGENET1K_V2``) ->
        ``{"url", "format"}``; a wrong name is a :class:`ConfigError` with the choices. A file is left to the
        generic loader (``None``): torchvision's layout maps onto ``body.*``."""
        if file is not None:
            return None
        from torchvision.models import get_model_weights

        enum = get_model_weights(f"resnet{self.depth}")
        owner, _, member = weights.rpartition(".")
        if owner and owner != enum.__name__:
            raise ConfigError(f"model.backbone.weights={weights!r}: a depth-{self.depth} ResNet takes "
                              f"{enum.__name__}.* weights")
        if member not in enum.__members__:
            raise ConfigError(f"model.backbone.weights={weights!r}: unknown torchvision weights for resnet{self.depth}"
                              f"{did_you_mean(member, enum.__members__)} (choices: {', '.join(enum.__members__)})")
        chosen = enum[member]
        return {"url": chosen.url, "format": f"torchvision {enum.__name__}.{chosen.name}"}

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images (B, 3, H, W)`` -> one map per returned stage, ``(B, out_channels[i], H/strides[i], W/strides[i])``
        (sizes rounded up)."""
        body = self.body
        x = images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        x = body.maxpool(conv_bn_act(body.conv1, body.bn1, x))
        outs = []
        for name in _STAGES:
            if name not in body:
                break
            x = body[name](x)
            if name in self.return_layers:
                outs.append(x)
        return outs
