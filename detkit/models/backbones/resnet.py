"""torchvision ResNet with frozen batch norm, as the DETR backbone."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
import torchvision
from torch import Tensor
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

from detkit.registry import BACKBONES

__all__ = ["ResNet"]

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
    """

    def __init__(
        self,
        depth: int = 50,
        frozen_stages: int = 1,
        dilation: bool = False,
        return_layers: Sequence[str] = ("layer4",),
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
        self.body = IntermediateLayerGetter(net, return_layers={name: name for name in return_layers})
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
        return list(self.body(images).values())
