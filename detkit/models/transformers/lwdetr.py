"""LW-DETR transformer: two-stage query selection and a lite, box-reparameterised deformable decoder.

There is no encoder. The projector levels are flattened into ``memory``; every memory position gets a fixed
proposal box (see :func:`gen_encoder_output_proposals`); per query group a two-stage head (``enc_output[g]``,
``enc_output_norm[g]``, ``enc_out_class_embed[g]``, ``enc_out_bbox_embed[g]``) scores the positions and refines the
proposals, and the ``num_queries`` best become the reference boxes of that group. Learned reference offsets
(``refpoint_embed``) are composed with them; the content queries are learned (``query_feat``), not gathered.

The reference boxes are computed once ("lite refinement") and shared by the 3 post-norm decoder layers: grouped
self-attention (queries attend only within their group), deformable cross-attention to the memory, FFN.

Group DETR: during training ``group_detr`` groups of ``num_queries`` queries run side by side (folded into the batch
in self-attention, matched independently by the loss); in eval mode only group 0 runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from detkit.models.layers import MLP, linear_relu
from detkit.ops.ms_deform_attn import MSDeformAttn, SpatialShapes
from detkit.ops.precision import geometry_dtype
from detkit.registry import TRANSFORMERS

__all__ = [
    "LWDETRTransformer",
    "LWDETRDecoder",
    "LWDETRDecoderLayer",
    "GroupedSelfAttention",
    "gen_encoder_output_proposals",
    "gen_sineembed_for_position",
    "compose_boxes",
]


def compose_boxes(delta: Tensor, ref: Tensor) -> Tensor:
    """Box re-parameterisation: ``cxcy = Δxy * ref_wh + ref_cxcy``, ``wh = exp(Δwh) * ref_wh`` (no sigmoid).

    ``delta (..., 4)``, ``ref (..., 4)`` cxcywh -> ``(..., 4)`` cxcywh, in float32 (or wider) whatever the inputs:
    under autocast the box head's ``delta`` is bf16/fp16, the boxes are composed in float32.
    """
    dtype = geometry_dtype(delta, ref)
    delta, ref = delta.to(dtype), ref.to(dtype)
    cxcy = delta[..., :2] * ref[..., 2:] + ref[..., :2]
    wh = delta[..., 2:].exp() * ref[..., 2:]
    return torch.cat((cxcy, wh), dim=-1)


def gen_encoder_output_proposals(
    memory: Tensor, padding_mask: Tensor, spatial_shapes: SpatialShapes
) -> tuple[Tensor, Tensor, Tensor]:
    """One fixed proposal per memory position, in normalised cxcywh of the valid (unpadded) image area.

    Level ``l`` (index in the list) proposes ``((x + 0.5) / valid_w, (y + 0.5) / valid_h, 0.05 * 2^l, 0.05 * 2^l)``.
    A proposal is valid iff all 4 values lie in ``(0.01, 0.99)`` and it is not padding; invalid proposals and their
    memory rows are set to 0.

    :param memory: ``(B, S, d)``.
    :param padding_mask: ``(B, S)`` bool, True at padding.
    :param spatial_shapes: ``[(h_l, w_l)]``.
    :returns: ``output_memory (B, S, d)``, ``proposals (B, S, 4)`` (float32, or the memory's dtype when wider) and
        ``valid (B, S)`` bool.
    """
    bs = memory.shape[0]
    proposals = []
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        m = padding_mask[:, start : start + h * w].view(bs, h, w)
        # float32 whatever the memory dtype (as the official code), and kept so under autocast
        valid_h = (~m[:, :, 0]).sum(1).float()
        valid_w = (~m[:, 0, :]).sum(1).float()
        ys = torch.arange(h, dtype=torch.float32, device=memory.device)
        xs = torch.arange(w, dtype=torch.float32, device=memory.device)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack((gx, gy), dim=-1)[None] + 0.5  # (1, h, w, 2)
        scale = torch.stack((valid_w, valid_h), dim=-1).view(bs, 1, 1, 2)
        centers = grid / scale
        wh = torch.full_like(centers, 0.05 * (2.0**lvl))
        proposals.append(torch.cat((centers, wh), dim=-1).view(bs, h * w, 4))
        start += h * w
    props = torch.cat(proposals, dim=1)
    valid = ((props > 0.01) & (props < 0.99)).all(-1) & ~padding_mask
    props = props.masked_fill(~valid[..., None], 0.0).to(geometry_dtype(memory))
    output_memory = memory.masked_fill(~valid[..., None], 0.0)
    return output_memory, props, valid


def gen_sineembed_for_position(pos: Tensor, dim: int = 128) -> Tensor:
    """Sine embedding of boxes ``(B, Q, 4)`` (cx, cy, w, h) -> ``(B, Q, 4*dim)`` ordered ``(y, x, w, h)``.

    Each coordinate is scaled by ``2π``, divided by ``10000^(2 floor(i/2) / dim)`` and turned into interleaved
    sin (even ``i``) / cos (odd ``i``) features. ``(B, Q, 2)`` points give ``(y, x)`` only.
    """
    scale = 2 * math.pi
    dim_t = torch.arange(dim, dtype=torch.float32, device=pos.device)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / dim)

    def embed(v: Tensor) -> Tensor:
        e = (v * scale)[..., None] / dim_t
        return torch.stack((e[..., 0::2].sin(), e[..., 1::2].cos()), dim=-1).flatten(-2)

    parts = [embed(pos[..., 1]), embed(pos[..., 0])]
    if pos.shape[-1] == 4:
        parts += [embed(pos[..., 2]), embed(pos[..., 3])]
    elif pos.shape[-1] != 2:
        raise ValueError(f"positions must end in 2 or 4 values, got shape {tuple(pos.shape)}")
    return torch.cat(parts, dim=-1).to(pos.dtype)


class GroupedSelfAttention(nn.Module):
    """Multi-head self-attention whose queries attend only inside their group of consecutive queries.

    Parameters and keys are those of ``nn.MultiheadAttention`` (``in_proj_weight (3d, d)``, ``in_proj_bias``,
    ``out_proj``), so official checkpoints load unchanged. ``(B, G*Q, d)`` -> ``(B, G*Q, d)``.
    """

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by sa_heads ({num_heads})")
        self.d_model = d_model
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, groups: int = 1) -> Tensor:
        """``q, k, v (B, G*Q, d)`` with ``G = groups`` -> ``(B, G*Q, d)``."""
        bs, n, d = q.shape
        nq = n // groups
        hd = d // self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        def heads(x: Tensor, w: Tensor, b: Tensor) -> Tensor:  # (B, G*Q, d) -> (B*G, heads, Q, hd)
            return F.linear(x, w, b).view(bs * groups, nq, self.num_heads, hd).transpose(1, 2)

        # groups folded into the batch: attention never crosses a group
        out = F.scaled_dot_product_attention(heads(q, w_q, b_q), heads(k, w_k, b_k), heads(v, w_v, b_v))
        return self.out_proj(out.transpose(1, 2).reshape(bs, n, d))


class LWDETRDecoderLayer(nn.Module):
    """Post-norm decoder layer: grouped self-attention, deformable cross-attention, FFN (ReLU), each add + norm.

    ``tgt (B, G*Q, d)`` -> ``(B, G*Q, d)``.
    """

    def __init__(
        self,
        d_model: int = 256,
        sa_heads: int = 8,
        ca_heads: int = 16,
        num_levels: int = 1,
        num_points: int = 2,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.self_attn = GroupedSelfAttention(d_model, sa_heads)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, num_levels, ca_heads, num_points)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: SpatialShapes,
        memory_padding_mask: Tensor | None,
        groups: int = 1,
    ) -> Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, k, tgt, groups)))
        ca = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, memory_padding_mask)
        tgt = self.norm2(tgt + self.dropout(ca))
        ffn = self.linear2(self.dropout(linear_relu(tgt, self.linear1)))
        return self.norm3(tgt + self.dropout(ffn))


class LWDETRDecoder(nn.Module):
    """Stack of decoder layers sharing one set of reference boxes; the final ``norm`` is applied to every layer's
    output. ``ref_point_head`` (MLP ``2d -> d -> d``) maps the boxes' sine embedding to the query position."""

    def __init__(self, layers: Sequence[LWDETRDecoderLayer], d_model: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.d_model = d_model

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        refpoints: Tensor,
        spatial_shapes: SpatialShapes,
        valid_ratios: Tensor,
        memory_padding_mask: Tensor | None,
        groups: int = 1,
    ) -> Tensor:
        """``tgt (B, N, d)``, ``memory (B, S, d)``, ``refpoints (B, N, 4)`` cxcywh, ``valid_ratios (B, L, 2)`` ->
        ``hs (num_layers, B, N, d)`` (normalised)."""
        # boxes relative to each level's padded map: (B, N, L, 4)
        ref_input = refpoints[:, :, None] * torch.cat((valid_ratios, valid_ratios), -1)[:, None]
        query_pos = self.ref_point_head(gen_sineembed_for_position(ref_input[:, :, 0], self.d_model // 2))
        out = tgt
        hs = []
        for layer in self.layers:
            out = layer(out, query_pos, ref_input, memory, spatial_shapes, memory_padding_mask, groups)
            hs.append(self.norm(out))
        return torch.stack(hs)


@TRANSFORMERS.register("lwdetr")
class LWDETRTransformer(nn.Module):
    """Two-stage query selection + lite deformable decoder (see the module docstring).

    :param d_model: width of memory and queries.
    :param num_layers: decoder layers.
    :param sa_heads: self-attention heads.
    :param ca_heads: deformable cross-attention heads.
    :param num_points: sampling points per head and level.
    :param dim_feedforward: FFN hidden width.
    :param dropout: dropout in the decoder layers (0 in every official recipe).
    :param num_levels: feature levels (injected: the projector's number of outputs).
    :param num_queries: queries per group (injected).
    :param group_detr: query groups during training (injected).
    :param num_classes: classes of the two-stage class heads (injected).
    """

    def __init__(
        self,
        d_model: int = 256,
        num_layers: int = 3,
        sa_heads: int = 8,
        ca_heads: int = 16,
        num_points: int = 2,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        num_levels: int = 1,
        num_queries: int = 300,
        group_detr: int = 13,
        num_classes: int = 91,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.num_levels = num_levels
        self.num_queries = num_queries
        self.group_detr = group_detr
        layers = [
            LWDETRDecoderLayer(d_model, sa_heads, ca_heads, num_levels, num_points, dim_feedforward, dropout)
            for _ in range(num_layers)
        ]
        self.decoder = LWDETRDecoder(layers, d_model)
        self.enc_output = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(group_detr))
        self.enc_output_norm = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(group_detr))
        # the detector overwrites these with copies of its own heads (the official init)
        self.enc_out_bbox_embed = nn.ModuleList(MLP(d_model, d_model, 4, 3) for _ in range(group_detr))
        self.enc_out_class_embed = nn.ModuleList(nn.Linear(d_model, num_classes) for _ in range(group_detr))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Official init: xavier on every matrix of the decoder and ``enc_output``, then the deformable init."""
        for module in (self.decoder, self.enc_output):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()

    def forward(
        self, srcs: Sequence[Tensor], masks: Sequence[Tensor], refpoint_embed: Tensor, query_feat: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Run query selection and the decoder.

        :param srcs: ``L`` maps ``(B, d, h_l, w_l)``.
        :param masks: ``L`` padding masks ``(B, h_l, w_l)``, True at padding.
        :param refpoint_embed: ``(G*Q, 4)`` learned reference offsets (G = groups in use).
        :param query_feat: ``(G*Q, d)`` learned content queries.
        :returns: ``hs (num_layers, B, G*Q, d)``, reference boxes ``(B, G*Q, 4)`` (cxcywh, detached),
            two-stage features ``(B, G*Q, d)`` and two-stage boxes ``(B, G*Q, 4)`` (not detached).
        """
        groups = refpoint_embed.shape[0] // self.num_queries
        if groups * self.num_queries != refpoint_embed.shape[0] or groups > self.group_detr:
            raise ValueError(
                f"refpoint_embed has {refpoint_embed.shape[0]} rows; expected a multiple (<= {self.group_detr}) "
                f"of num_queries={self.num_queries}"
            )
        # the sizes as the input has them (not int(): ONNX tracing and dynamic torch.compile keep them symbolic)
        spatial_shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]
        memory = torch.cat([s.permute(0, 2, 3, 1).flatten(1, 2) for s in srcs], dim=1)  # (B, S, d)
        mask_flat = torch.cat([m.flatten(1) for m in masks], dim=1)  # (B, S)
        valid_ratios = torch.stack([self.valid_ratio(m) for m in masks], dim=1).to(geometry_dtype(memory))  # (B, L, 2)
        if memory.shape[1] < self.num_queries:
            raise ValueError(
                f"the feature maps hold {memory.shape[1]} positions ({spatial_shapes}), fewer than num_queries="
                f"{self.num_queries}; use a larger input or fewer queries"
            )

        output_memory, proposals, _ = gen_encoder_output_proposals(memory, mask_flat, spatial_shapes)
        ref_ts, feat_ts, boxes_ts = [], [], []
        needs_grad = torch.is_grad_enabled()
        for g in range(groups):
            def project(x: Tensor, g: int = g) -> Tensor:
                return self.enc_output_norm[g](self.enc_output[g](x))

            # The scores only choose positions (top-k indices carry no gradient), and every head is row-wise: the
            # loss sees the Q selected rows only. So score all S positions without autograd and, when training, run
            # the projection again on the selected rows (Q of S) to get their gradients; the box head runs on the
            # selected rows only. Same values and gradients as scoring everything with autograd, for less work.
            with torch.no_grad():
                om = project(output_memory)
                topk = self.enc_out_class_embed[g](om).max(-1).values.topk(self.num_queries, dim=1).indices  # (B, Q)
            if needs_grad:
                om_topk = project(output_memory.gather(1, topk[..., None].expand(-1, -1, self.d_model)))
            else:
                om_topk = om.gather(1, topk[..., None].expand(-1, -1, self.d_model))
            props_topk = proposals.gather(1, topk[..., None].expand(-1, -1, 4))
            boxes_g = compose_boxes(self.enc_out_bbox_embed[g](om_topk), props_topk)
            feat_ts.append(om_topk)
            boxes_ts.append(boxes_g)
            ref_ts.append(boxes_g.detach())
        ref_t = torch.cat(ref_ts, dim=1)
        bs = memory.shape[0]
        refpoints = compose_boxes(refpoint_embed[None].expand(bs, -1, -1), ref_t)
        tgt = query_feat[None].expand(bs, -1, -1)
        hs = self.decoder(tgt, memory, refpoints, spatial_shapes, valid_ratios, mask_flat, groups)
        return hs, refpoints, torch.cat(feat_ts, dim=1), torch.cat(boxes_ts, dim=1)

    @staticmethod
    def valid_ratio(mask: Tensor) -> Tensor:
        """``(B, h, w)`` padding mask -> ``(B, 2)`` fraction of valid columns and rows ``(w_ratio, h_ratio)``."""
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        return torch.stack((valid_w.float() / w, valid_h.float() / h), dim=-1)
