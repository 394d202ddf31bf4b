"""LW-DETR multi-scale projector: resample every ViT map to each output scale, concatenate, C2f, channel LayerNorm.

For each requested scale ``P3 | P4 | P5`` (strides 8 / 16 / 32 from stride-16 inputs) and each input map ``j`` there
is a sampling branch ``stages_sampling[s][j]``:

- ``P3`` (x2): ``ConvTranspose2d(D, D/2, 2, 2)``; for ``D > 512`` first ``ConvX(D, D/2, 1)`` then
  ``ConvTranspose2d(D/2, D/4, 2, 2)``;
- ``P4`` (x1): identity;
- ``P5`` (x1/2): ``ConvX(D, D, 3, stride 2)``.

``stages[s]`` is ``C2f(sum of sampled channels, out_channels, n=num_blocks)`` then a channel-first
``LayerNorm(eps=1e-6)``. ``P6`` adds no parameters: the last output is max-pooled (kernel 1, stride 2) and appended.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from torch import Tensor

from detkit.registry import NECKS

__all__ = ["ConvX", "Bottleneck", "C2f", "MultiScaleProjector"]

_SCALE_LEVEL = {"P3": 3, "P4": 4, "P5": 5, "P6": 6}


class ConvX(nn.Sequential):
    """``Conv2d(bias=False, padding=k//2)`` + ``BatchNorm2d`` + activation (keys ``conv``, ``bn``)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = act()


class Bottleneck(nn.Module):
    """Two ``ConvX(c, c, 3)``; ``shortcut`` adds the input (LW-DETR's C2f uses none)."""

    def __init__(self, c_in: int, c_out: int, shortcut: bool = False, act: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        self.cv1 = ConvX(c_in, c_out, 3, act=act)
        self.cv2 = ConvX(c_out, c_out, 3, act=act)
        self.add = shortcut and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP block with 2 convolutions (YOLOv8 style): ``(B, c_in, h, w)`` -> ``(B, c_out, h, w)``.

    ``cv1`` makes ``2c`` channels (``c = c_out * e``) split in two halves; ``n`` bottlenecks run one after another on
    the last chunk and every output is kept; ``cv2`` fuses the ``(2 + n) c`` channels.
    """

    def __init__(
        self, c_in: int, c_out: int, n: int = 3, shortcut: bool = False, e: float = 0.5, act: type[nn.Module] = nn.SiLU
    ) -> None:
        super().__init__()
        self.c = int(c_out * e)
        self.cv1 = ConvX(c_in, 2 * self.c, 1, act=act)
        self.cv2 = ConvX((2 + n) * self.c, c_out, 1, act=act)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, act=act) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        y = list(self.cv1(x).split((self.c, self.c), 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


@NECKS.register("multiscale_projector")
class MultiScaleProjector(nn.Module):
    """Fuse ``N`` same-stride ViT maps into one map per requested scale.

    ``forward(list of N (B, in_channels[j], h, w)) -> list`` of ``(B, out_channels, h_s, w_s)`` in the order of
    ``scales`` (``P6``, when given, last).

    :param in_channels: channels of each input map (injected by the recipe from the backbone).
    :param out_channels: channels of every output (the transformer width).
    :param scales: output scales among ``P3``, ``P4``, ``P5``, ``P6`` (``P6`` needs another scale before it).
    :param in_stride: stride of the input maps (injected; all inputs share it).
    :param num_blocks: bottlenecks in each C2f.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        scales: Sequence[str] = ("P4",),
        in_stride: int = 16,
        num_blocks: int = 3,
    ) -> None:
        super().__init__()
        unknown = [s for s in scales if s not in _SCALE_LEVEL]
        if unknown or not scales:
            raise ValueError(f"scales must be a non-empty list of P3, P4, P5, P6; got {list(scales)}")
        if len(set(scales)) != len(scales):
            raise ValueError(f"scales has duplicates: {list(scales)}")
        self.scales = list(scales)
        self.use_extra_pool = "P6" in self.scales
        if self.use_extra_pool and (self.scales[-1] != "P6" or len(self.scales) == 1):
            raise ValueError(f"P6 is pooled from the previous scale: list it last, after another scale ({scales})")
        conv_scales = [s for s in self.scales if s != "P6"]
        self.stages_sampling = nn.ModuleList()
        self.stages = nn.ModuleList()
        for s in conv_scales:
            factor = in_stride / 2 ** _SCALE_LEVEL[s]
            branches = nn.ModuleList()
            total = 0
            for c in in_channels:
                layers: list[nn.Module] = []
                if factor == 2.0:
                    if c > 512:
                        layers += [ConvX(c, c // 2, 1), nn.ConvTranspose2d(c // 2, c // 4, 2, stride=2)]
                        total += c // 4
                    else:
                        layers += [nn.ConvTranspose2d(c, c // 2, 2, stride=2)]
                        total += c // 2
                elif factor == 1.0:
                    total += c
                elif factor == 0.5:
                    layers += [ConvX(c, c, 3, stride=2)]
                    total += c
                else:
                    raise ValueError(f"scale {s} is not reachable from stride-{in_stride} inputs")
                branches.append(nn.Sequential(*layers))
            self.stages_sampling.append(branches)
            c2f = C2f(total, out_channels, n=num_blocks)
            self.stages.append(nn.Sequential(c2f, LayerNorm2d(out_channels, eps=1e-6)))
        self.out_channels: list[int] = [out_channels] * len(self.scales)
        self.strides: list[int] = [2 ** _SCALE_LEVEL[s] for s in self.scales]

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """``N`` maps ``(B, C_j, h, w)`` -> ``len(scales)`` maps ``(B, out_channels, h_s, w_s)``."""
        if len(feats) != len(self.stages_sampling[0]):
            raise ValueError(f"projector built for {len(self.stages_sampling[0])} inputs, got {len(feats)}")
        outs = []
        for branches, stage in zip(self.stages_sampling, self.stages):
            outs.append(stage(torch.cat([b(f) for b, f in zip(branches, feats)], dim=1)))
        if self.use_extra_pool:
            outs.append(nn.functional.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return outs
