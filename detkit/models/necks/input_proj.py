"""The DETR neck: a 1x1 convolution from the last backbone stage to the transformer width."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from torch import Tensor

from detkit.registry import NECKS

__all__ = ["InputProj"]


@NECKS.register("input_proj")
class InputProj(nn.Module):
    """Projects the last backbone feature map with a 1x1 conv (key ``proj.weight`` = official ``input_proj.weight``).

    :param in_channels: backbone channels per returned stage (injected by the recipe); only the last is used.
    :param hidden_dim: output channels (the transformer width).
    """

    def __init__(self, in_channels: Sequence[int], hidden_dim: int = 256) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.proj = nn.Conv2d(self.in_channels[-1], hidden_dim, kernel_size=1)
        self.out_channels: list[int] = [hidden_dim]

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """``features``: backbone maps, the last ``(B, in_channels[-1], h, w)`` -> ``[(B, hidden_dim, h, w)]``."""
        return [self.proj(features[-1])]
