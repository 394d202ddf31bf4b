"""Multi-scale deformable attention (Deformable DETR), pure PyTorch.

The sampling is bilinear ``grid_sample`` (``align_corners=False``, zero padding), as the official
``ms_deform_attn_core_pytorch`` and the official CUDA kernel compute it. Heads are folded into the batch so that each
level costs one ``grid_sample``; the per-level Python loop runs over a static list of shapes (no host-device sync,
no data-dependent control flow), so the function traces under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from detkit.ops.precision import geometry_dtype

__all__ = ["ms_deform_attn", "ms_deform_attn_cm", "MSDeformAttn", "SpatialShapes", "level_sizes_wh"]

#: ``[(h_0, w_0), (h_1, w_1), ...]`` per feature level, as Python ints (kept off the device on purpose); the
#: input's own sizes, so they are SymInts under ``torch.compile(dynamic=True)`` and traced values under ONNX tracing
SpatialShapes = Sequence[tuple[int, int]]


def ms_deform_attn(
    value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Sample ``value`` at the given locations of every level and sum with the attention weights.

    :param value: ``(B, S, H, Dh)`` with ``S = sum(h_l * w_l)``, the levels flattened row-major one after another.
    :param spatial_shapes: ``[(h_l, w_l)]`` per level.
    :param sampling_locations: ``(B, Q, H, L, P, 2)`` as ``(x, y)`` in ``[0, 1]`` of each level (outside = zeros).
    :param attention_weights: ``(B, Q, H, L, P)``, normally softmaxed over ``L*P``.
    :returns: ``(B, Q, H*Dh)`` in the dtype of ``value``; the sampling runs in float32 (or wider) whatever the dtypes.
    """
    bs, num_values, num_heads, head_dim = value.shape
    # (B, S, H, Dh) -> channel-major (B, H*Dh, S)
    value_cm = value.permute(0, 2, 3, 1).reshape(bs, num_heads * head_dim, num_values)
    return ms_deform_attn_cm(value_cm, num_heads, spatial_shapes, sampling_locations, attention_weights).transpose(1, 2)


def ms_deform_attn_cm(
    value: Tensor, num_heads: int, spatial_shapes: SpatialShapes, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """:func:`ms_deform_attn` on a channel-major value ``(B, H*Dh, S)``, returning channel-major ``(B, H*Dh, Q)``.

    This is the layout ``grid_sample`` reads (``(B*H, Dh, h, w)`` is a free view of it), so the module computes its
    value projection straight into it and no activation-sized permute is needed in the forward or the backward.
    """
    bs, channels, _ = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    if len(spatial_shapes) != num_levels:
        raise ValueError(f"{len(spatial_shapes)} spatial shapes for {num_levels} levels of sampling locations")
    head_dim = channels // num_heads
    # under autocast the value arrives in bf16/fp16; the sampling grid must not (bilinear weights and the location
    # itself would carry 8 bits), and grid_sample wants one dtype, so the sampling runs in float32
    out_dtype, sample_dtype = value.dtype, geometry_dtype(value, sampling_locations)
    value = value.to(sample_dtype)
    values = value.reshape(bs * num_heads, head_dim, -1).split([h * w for h, w in spatial_shapes], dim=-1)
    # grid_sample works in [-1, 1]; heads go into the batch. Samples are laid out (B*H, Dh, P, Q), queries
    # innermost, so that the weighting and the sum over points (and their backward) run along contiguous rows of Q.
    grids = 2 * sampling_locations.to(sample_dtype) - 1
    weights = attention_weights.permute(0, 2, 3, 4, 1).reshape(bs * num_heads, 1, num_levels, num_points, num_queries)
    out = None
    for lvl, (h, w) in enumerate(spatial_shapes):
        # a contiguous (B*H, P, Q, 2) grid per level: grid_sample's CPU kernel is ~4x slower on a strided one
        grid = grids[:, :, :, lvl].permute(0, 2, 3, 1, 4).flatten(0, 1).contiguous()
        # (B*H, Dh, P, Q)
        sampled = F.grid_sample(values[lvl].unflatten(-1, (h, w)), grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)
        # weighted sum over the level's points, accumulated over levels (no (B*H, Dh, L*P, Q) concatenation: at
        # the large model's shapes that is a 100 MB buffer written, read and, in backward, split again)
        level_out = (sampled * weights[:, :, lvl]).sum(2)  # (B*H, Dh, Q)
        out = level_out if out is None else out + level_out
    return out.view(bs, channels, num_queries).to(out_dtype)


def level_sizes_wh(spatial_shapes: SpatialShapes, like: Tensor) -> Tensor:
    """``(L, 2)`` tensor of ``(w_l, h_l)`` per level, in ``like``'s dtype and device.

    Under ONNX tracing the sizes are traced 0-dim tensors (the input's shape): stacking them keeps them computed in
    the graph, where ``torch.tensor`` would bake the example's values in as a constant.
    """
    if torch.jit.is_tracing():
        sizes = [torch.stack([torch.as_tensor(w), torch.as_tensor(h)]) for h, w in spatial_shapes]
        return torch.stack(sizes).to(dtype=like.dtype, device=like.device)
    return torch.tensor([[w, h] for h, w in spatial_shapes], dtype=like.dtype, device=like.device)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (keys as the official ``MSDeformAttn``).

    :param d_model: channels of queries and values.
    :param n_levels: number of feature levels.
    :param n_heads: attention heads (``d_model`` must be divisible by it).
    :param n_points: sampling points per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 1, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, n_points={self.n_points}"

    def reset_parameters(self) -> None:
        """Official init: offsets start on a star of directions (one per head), scaled by the point index."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        if self.sampling_offsets.bias.device.type != "meta":
            thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
            grid = torch.stack([thetas.cos(), thetas.sin()], -1)
            grid = grid / grid.abs().max(-1, keepdim=True)[0]
            grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
            grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
            with torch.no_grad():
                self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: SpatialShapes,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from each query to ``n_points`` locations per head and level around its reference.

        :param query: ``(B, Q, d_model)``.
        :param reference_points: ``(B, Q, L, 2)`` points ``(x, y)`` or ``(B, Q, L, 4)`` boxes ``(cx, cy, w, h)``,
            in ``[0, 1]`` of each level's (padded) map, i.e. already multiplied by the valid ratios.
            With boxes the offsets are scaled by half the box size divided by ``n_points``.
        :param value: ``(B, S, d_model)`` flattened levels, ``S = sum(h_l * w_l)``.
        :param spatial_shapes: ``[(h_l, w_l)]`` per level (Python ints).
        :param padding_mask: ``(B, S)`` bool, True at padding (those values are zeroed).
        :returns: ``(B, Q, d_model)``.
        """
        bs, num_queries, _ = query.shape
        # value projection computed channel-major, (B, d, S): the layout the sampling reads
        # (one batched GEMM reading the transposed value in place; matmul would first copy it contiguous)
        value = torch.baddbmm(self.value_proj.bias[:, None], self.value_proj.weight.expand(bs, -1, -1),
                              value.transpose(1, 2))
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[:, None, :], 0.0)
        offsets = self.sampling_offsets(query).view(bs, num_queries, self.n_heads, self.n_levels, self.n_points, 2)
        offsets = offsets.to(geometry_dtype(offsets, reference_points))  # locations in float32 under autocast
        weights = self.attention_weights(query).view(bs, num_queries, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(bs, num_queries, self.n_heads, self.n_levels, self.n_points)
        ref = reference_points[:, :, None, :, None, :]
        if reference_points.shape[-1] == 2:
            normalizer = level_sizes_wh(spatial_shapes, offsets)  # (L, 2) as (w, h)
            locations = ref + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = ref[..., :2] + offsets / self.n_points * ref[..., 2:] * 0.5
        else:
            raise ValueError(f"reference_points must end in 2 or 4 values, got shape {tuple(reference_points.shape)}")
        out = ms_deform_attn_cm(value, self.n_heads, spatial_shapes, locations, weights)
        return self.output_proj(out.transpose(1, 2))
