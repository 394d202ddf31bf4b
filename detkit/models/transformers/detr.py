"""The DETR encoder-decoder transformer (post-norm by default, as the official code)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from detkit.registry import TRANSFORMERS

__all__ = ["DETRTransformer", "EncoderLayer", "DecoderLayer"]

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class EncoderLayer(nn.Module):
    """Self-attention (``q = k = src + pos``, ``v = src``) and FFN, each with residual and LayerNorm.

    Keys ``self_attn.{in_proj_weight,in_proj_bias,out_proj.*}``, ``linear1``, ``linear2``, ``norm1``, ``norm2``.
    Tensors are batch-first: ``(B, N, d_model)``.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, activation: str,
                 normalize_before: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _ACTIVATIONS[activation]
        self.normalize_before = normalize_before

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(self, src: Tensor, key_padding_mask: Tensor | None, pos: Tensor | None) -> Tensor:
        """``src (B, N, d)``, ``key_padding_mask (B, N)`` True = padding, ``pos (B, N, d)`` -> ``(B, N, d)``."""
        if self.normalize_before:
            x = self.norm1(src)
            q = _with_pos(x, pos)
            src = src + self.dropout1(self.self_attn(q, q, x, key_padding_mask=key_padding_mask, need_weights=False)[0])
            return src + self.dropout2(self._ffn(self.norm2(src)))
        q = _with_pos(src, pos)
        attn = self.self_attn(q, q, src, key_padding_mask=key_padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(attn))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class DecoderLayer(nn.Module):
    """Query self-attention, cross-attention to the memory, FFN; each with residual and LayerNorm.

    Keys ``self_attn``, ``multihead_attn``, ``linear1``, ``linear2``, ``norm1..3``. Batch-first tensors.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, activation: str,
                 normalize_before: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _ACTIVATIONS[activation]
        self.normalize_before = normalize_before

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor | None, pos: Tensor | None,
                query_pos: Tensor | None) -> Tensor:
        """``tgt (B, Q, d)``, ``memory (B, N, d)``, mask ``(B, N)``, ``pos (B, N, d)``, ``query_pos (B, Q, d)``."""
        pre = self.normalize_before
        x = self.norm1(tgt) if pre else tgt
        q = _with_pos(x, query_pos)
        tgt = tgt + self.dropout1(self.self_attn(q, q, x, need_weights=False)[0])
        if not pre:
            tgt = self.norm1(tgt)
        x = self.norm2(tgt) if pre else tgt
        attn = self.multihead_attn(_with_pos(x, query_pos), _with_pos(memory, pos), memory,
                                   key_padding_mask=memory_key_padding_mask, need_weights=False)[0]
        tgt = tgt + self.dropout2(attn)
        if not pre:
            tgt = self.norm2(tgt)
        x = self.norm3(tgt) if pre else tgt
        tgt = tgt + self.dropout3(self._ffn(x))
        return tgt if pre else self.norm3(tgt)


class _Stack(nn.Module):
    """``layers.{i}`` plus an optional final ``norm``, mirroring the official encoder/decoder key layout."""

    def __init__(self, layer: nn.Module, num_layers: int, norm: nn.Module | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm


@TRANSFORMERS.register("detr")
class DETRTransformer(nn.Module):
    """DETR's encoder-decoder: 6 + 6 layers, 8 heads, FFN 2048, dropout 0.1, ReLU, post-norm.

    The encoder has a final LayerNorm only in pre-norm mode; the decoder always has one and applies it to every
    layer's output (``hs[l]`` for each ``l``), as the official ``return_intermediate=True`` path. State-dict keys
    equal the official ``transformer.*`` keys. Parameters with ``dim > 1`` are Xavier-uniform initialised.

    :param d_model: width (``hidden_dim``).
    :param nhead: attention heads.
    :param num_encoder_layers: encoder depth.
    :param num_decoder_layers: decoder depth.
    :param dim_feedforward: FFN hidden width.
    :param dropout: dropout of residual branches, FFN and attention weights.
    :param activation: ``relu`` or ``gelu``.
    :param normalize_before: pre-norm layers (the official default is post-norm).
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if d_model % nhead:
            raise ValueError(f"d_model={d_model} is not divisible by nhead={nhead}")
        if num_decoder_layers < 1:
            raise ValueError("the DETR transformer needs at least one decoder layer")
        args = (d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        self.encoder = _Stack(EncoderLayer(*args), num_encoder_layers,
                              nn.LayerNorm(d_model) if normalize_before else None)
        self.decoder = _Stack(DecoderLayer(*args), num_decoder_layers, nn.LayerNorm(d_model))
        self.d_model = d_model
        self.nhead = nhead
        self.num_encoder_layers = num_encoder_layers
        self.num_decoder_layers = num_decoder_layers
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Encode the feature map and decode the queries.

        :param src: ``(B, d, h, w)`` projected features.
        :param mask: ``(B, h, w)`` bool, True = padding.
        :param query_embed: ``(Q, d)`` learned query positions.
        :param pos: ``(B, d, h, w)`` position encoding of ``src``.
        :returns: ``hs (L, B, Q, d)``, every decoder layer's normalised output, and ``memory (B, d, h, w)``.
        """
        bs, c, h, w = src.shape
        src = src.flatten(2).transpose(1, 2)
        pos = pos.flatten(2).transpose(1, 2).to(src.dtype)
        mask = mask.flatten(1)
        query_pos = query_embed[None].expand(bs, -1, -1)

        memory = src
        for layer in self.encoder.layers:
            memory = layer(memory, mask, pos)
        if self.encoder.norm is not None:
            memory = self.encoder.norm(memory)

        tgt = torch.zeros_like(query_pos)
        hs = []
        for layer in self.decoder.layers:
            tgt = layer(tgt, memory, mask, pos, query_pos)
            hs.append(self.decoder.norm(tgt))
        return torch.stack(hs), memory.transpose(1, 2).reshape(bs, c, h, w)
