"""Fixed 2-D sine/cosine position encoding (DETR, LW-DETR)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from detkit.registry import POSITION_ENCODINGS

__all__ = ["SinePositionEncoding"]


@POSITION_ENCODINGS.register("sine")
class SinePositionEncoding(nn.Module):
    """The "Attention is all you need" encoding, generalised to images and computed from the padding mask.

    ``y`` / ``x`` are the cumulative counts of valid pixels along H / W (optionally normalised by the last one and
    multiplied by ``scale``); channel ``i`` of each half uses ``t^(2*floor(i/2)/num_pos_feats)``; even channels are sin,
    odd are cos (interleaved); the y half comes first. No parameters.

    :param num_pos_feats: channels per axis (``hidden_dim // 2``); the output has ``2 * num_pos_feats`` channels.
    :param temperature: the base ``t``.
    :param normalize: divide the cumulative sums by their last value (plus 1e-6), i.e. positions in (0, 1].
    :param scale: multiplier after normalising; ``None`` means ``2π``.
    """

    def __init__(
        self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True, scale: float | None = None
    ) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def extra_repr(self) -> str:
        return f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, normalize={self.normalize}"

    def forward(self, mask: Tensor) -> Tensor:
        """``mask (B, h, w)`` bool (True = padding, already at feature size) -> ``(B, 2*num_pos_feats, h, w)`` fp32."""
        not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
