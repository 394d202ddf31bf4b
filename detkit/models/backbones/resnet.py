"""torchvision ResNet with frozen batch norm, as the DETR backbone."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from detkit.registry import BACKBONES

__all__ = ["ResNet", "conv_frozen_bn"]


def conv_frozen_bn(conv: nn.Conv2d, bn: nn.Module, x: Tensor) -> Tensor:
    """``bn(conv(x))`` with a :class:`FrozenBatchNorm2d` folded into the convolution on the fly.

    A frozen BN is a fixed per-channel affine map ``y * s + t``, so ``conv(x, W) * s + t == conv(x, W * s) + t``: the
    same function and the same gradients for ``W`` (through ``W * s``), without the two element-wise passes (and
    their backward) over the activation. The state dict is untouched. Any other ``bn`` (e.g. ``nn.Identity`` after
    :func:`detkit.models.fuse.fold_batch_norms`) is applied as usual.
    """
    if not isinstance(bn, FrozenBatchNorm2d):
        return bn(conv(x))
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    shift = bn.bias - bn.running_mean * scale
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class _FusedBottleneck(Bottleneck):
    """torchvision's ``Bottleneck`` (same modules and keys) whose frozen BNs are folded into the convs on the fly."""

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(conv_frozen_bn(self.conv1, self.bn1, x))
        out = F.relu(conv_frozen_bn(self.conv2, self.bn2, out))
        out = conv_frozen_bn(self.conv3, self.bn3, out)
        identity = x if self.downsample is None else conv_frozen_bn(self.downsample[0], self.downsample[1], x)
        return F.relu(out + identity)


class _FusedBasicBlock(BasicBlock):
    """torchvision's ``BasicBlock`` (same modules and keys) with frozen BNs folded on the fly."""

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(conv_frozen_bn(self.conv1, self.bn1, x))
        out = conv_frozen_bn(self.conv2, self.bn2, out)
        identity = x if self.downsample is None else conv_frozen_bn(self.downsample[0], self.downsample[1], x)
        return F.relu(out + identity)

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

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images (B, 3, H, W)`` -> one map per returned stage, ``(B, out_channels[i], H/strides[i], W/strides[i])``
        (sizes rounded up)."""
        body = self.body
        x = images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        x = body.maxpool(F.relu(conv_frozen_bn(body.conv1, body.bn1, x)))
        outs = []
        for name in _STAGES:
            if name not in body:
                break
            x = body[name](x)
            if name in self.return_layers:
                outs.append(x)
        return outs
