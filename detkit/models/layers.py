"""Small layers shared by several models."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MLP", "downsample_mask", "linear_relu"]


def downsample_mask(mask: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Padding ``mask (B, H, W)`` (True = padding) -> ``(B, h, w)`` bool at a feature map's ``size = (h, w)``,
    nearest-neighbour like the official DETR and LW-DETR code."""
    return F.interpolate(mask[None].float(), size=tuple(size), mode="nearest")[0].to(torch.bool)


def linear_relu(x: Tensor, layer: nn.Linear) -> Tensor:
    """``relu(layer(x))``, ``(..., in)`` -> ``(..., out)``, with the ReLU applied in place on the 2-D product.

    The product of a flattened input is a fresh tensor whose backward does not need it, so the ReLU can overwrite it
    (one activation-sized buffer less). ``layer(x)`` itself would not do: for inputs of more than two dimensions
    ``F.linear`` returns a *view* of its product, and an in-place op on a view makes autograd zero-fill, clone and
    scatter the whole gradient in backward (``CopySlices``), which costs more than the buffer saves.
    """
    y = F.linear(x.reshape(-1, x.shape[-1]), layer.weight, layer.bias).relu_()
    return y.view(*x.shape[:-1], y.shape[-1])


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (none after the last).

    State-dict keys are ``layers.{i}.weight`` / ``layers.{i}.bias``, as in the official DETR and LW-DETR code.
    Input ``(..., input_dim)`` -> output ``(..., output_dim)``.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP needs at least one layer, got num_layers={num_layers}")
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = linear_relu(x, layer)
        return self.layers[-1](x)
