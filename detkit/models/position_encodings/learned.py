"""Learned absolute 2-D position encoding (DETR ``--position_embedding learned``)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from detkit.registry import POSITION_ENCODINGS

__all__ = ["LearnedPositionEncoding"]


@POSITION_ENCODINGS.register("learned")
class LearnedPositionEncoding(nn.Module):
    """Row and column embeddings (``num_embeddings x num_pos_feats`` each, uniform init), concatenated x then y.

    Keys ``row_embed.weight`` / ``col_embed.weight`` as the official ``backbone.1.*``. Feature maps may be at most
    ``num_embeddings`` cells high and wide.

    :param num_pos_feats: channels per axis; the output has ``2 * num_pos_feats`` channels.
    :param num_embeddings: maximum feature-map height and width.
    """

    def __init__(self, num_pos_feats: int = 128, num_embeddings: int = 50) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.num_embeddings = num_embeddings
        self.row_embed = nn.Embedding(num_embeddings, num_pos_feats)
        self.col_embed = nn.Embedding(num_embeddings, num_pos_feats)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor) -> Tensor:
        """``mask (B, h, w)`` (only its shape is used) -> ``(B, 2*num_pos_feats, h, w)``."""
        bs, h, w = mask.shape
        if h > self.num_embeddings or w > self.num_embeddings:
            raise ValueError(f"feature map {h}x{w} is larger than the learned encoding ({self.num_embeddings} cells)")
        x_emb = self.col_embed(torch.arange(w, device=mask.device))
        y_emb = self.row_embed(torch.arange(h, device=mask.device))
        pos = torch.cat((x_emb[None].expand(h, w, -1), y_emb[:, None].expand(h, w, -1)), dim=-1)
        return pos.permute(2, 0, 1)[None].expand(bs, -1, -1, -1)
