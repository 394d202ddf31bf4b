"""LW-DETR's plain ViT encoder (ViTDet-derived, CAE-style blocks) with interleaved window and global attention.

Window organisation (as the official code): the token map of each image is cut into a **fixed grid** of
``window_grid x window_grid`` windows (4x4), so the window size grows with the input (10x10 tokens at 640x640).
Tokens are kept *window-major* between blocks, ``(B * grid^2, h*w, D)``: a window block attends inside each of
those sequences, a global block views them as ``(B, grid^2 * h*w, D)`` and attends over everything (the order of
the tokens does not matter there, the position embedding was added before reordering). The input sides must
therefore be multiples of ``patch_size * window_grid`` (64); the backbone raises a clear error otherwise. The LW-DETR
detector pads its input batch to such a multiple itself (marking the extra pixels as padding), so users can feed
any size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor

from detkit.registry import BACKBONES

__all__ = ["ViT", "window_partition", "window_unpartition"]


def window_partition(x: Tensor, grid: int) -> Tensor:
    """Raster tokens ``(B, H, W, D)`` -> window-major ``(B * grid^2, (H/grid) * (W/grid), D)``.

    Window ``(i, j)`` (row ``i``, column ``j`` of the grid) of image ``b`` is sequence ``b * grid^2 + i * grid + j``.
    """
    b, hh, ww, d = x.shape
    h, w = hh // grid, ww // grid
    x = x.view(b, grid, h, grid, w, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * grid * grid, h * w, d)


def window_unpartition(x: Tensor, grid: int, hw: tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B * grid^2, h*w, D)`` -> ``(B, H, W, D)`` with ``(H, W) = hw``."""
    hh, ww = hw
    h, w = hh // grid, ww // grid
    d = x.shape[-1]
    x = x.view(-1, grid, grid, h, w, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, hh, ww, d)


class PatchEmbed(nn.Module):
    """``Conv2d(in_chans, D, patch, stride=patch)``; ``(B, 3, H, W)`` -> channels-last ``(B, H/p, W/p, D)``."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Attention(nn.Module):
    """Multi-head self-attention with a q and a v bias but no k bias (CAE / BEiT style).

    Keys: ``qkv.weight`` (no bias), ``q_bias``, ``v_bias``, ``proj``. ``(N, T, D)`` -> ``(N, T, D)``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).view(n, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, T, hd)
        x = F.scaled_dot_product_attention(q, k, v)  # scale hd^-0.5, as the official code
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """``fc2(gelu(fc1(x)))``, ``(..., D)`` -> ``(..., D)``; keys ``fc1``, ``fc2`` (as timm's ``Mlp``).

    Without autograd the GELU overwrites ``fc1``'s output instead of allocating a second hidden-sized buffer, the
    largest activation of a block (about 7% of LW-DETR-tiny's CPU inference time). Traced exports see the plain op.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if h.requires_grad or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            h = F.gelu(h)
        else:
            h = torch.ops.aten.gelu_(h)
        return self.fc2(h)


class Block(nn.Module):
    """Pre-norm transformer block with layer scale: ``x + dp(g1 * attn(ln1(x)))``, ``x + dp(g2 * mlp(ln2(x)))``.

    ``window=True`` attends inside each window sequence; otherwise the ``grid^2`` window sequences of an image are
    joined into one. Input and output ``(B * grid^2, h*w, D)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale_init: float = 0.1,
        window: bool = False,
        num_windows: int = 16,
    ) -> None:
        super().__init__()
        self.window = window
        self.num_windows = num_windows
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(layer_scale_init * torch.ones(dim))
        self.gamma_2 = nn.Parameter(layer_scale_init * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        if not self.window:
            nw, t, d = y.shape
            y = self.attn(y.reshape(nw // self.num_windows, self.num_windows * t, d)).view(nw, t, d)
        else:
            y = self.attn(y)
        x = x + self.drop_path(self.gamma_1 * y)
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


@BACKBONES.register("vit")
class ViT(nn.Module):
    """LW-DETR ViT encoder: patch embedding, interpolated absolute position embedding, window/global blocks.

    ``forward(images (B, 3, H, W)) -> list`` of ``(B, D, H/16, W/16)`` maps, one per entry of ``out_indices`` (block
    outputs, no final norm). The padding mask is not used (as the official code). ``H`` and ``W`` must be multiples of
    ``patch_size * window_grid``.

    :param embed_dim: token width ``D``.
    :param depth: number of blocks.
    :param num_heads: attention heads per block.
    :param window_blocks: indices of the blocks that use window attention (the others are global).
    :param out_indices: indices of the blocks whose outputs are returned.
    :param drop_path: largest stochastic-depth rate (``linspace(0, drop_path, depth)`` over the blocks).
    :param mlp_ratio: MLP hidden width / ``D``.
    :param patch_size: patch side (stride of every output).
    :param pretrain_img_size: image side of the pretraining; the position embedding holds
        ``(pretrain_img_size / patch_size)^2`` tokens plus an (unused) class-token slot.
    :param window_grid: windows per image side (4 -> 16 windows).
    :param layer_scale_init: initial value of the layer-scale vectors ``gamma_1``, ``gamma_2``.
    :param in_chans: image channels.
    """

    def __init__(
        self,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 12,
        window_blocks: Sequence[int] = (0, 2, 4),
        out_indices: Sequence[int] = (1, 3, 5),
        drop_path: float = 0.0,
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        pretrain_img_size: int = 224,
        window_grid: int = 4,
        layer_scale_init: float = 0.1,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        for name, idx in (("window_blocks", window_blocks), ("out_indices", out_indices)):
            bad = [i for i in idx if not 0 <= i < depth]
            if bad:
                raise ValueError(f"{name} {list(idx)} has indices outside 0..{depth - 1}: {bad}")
        if not out_indices:
            raise ValueError("out_indices must name at least one block")
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_size = patch_size
        self.window_grid = window_grid
        self.window_blocks = sorted(window_blocks)
        self.out_indices = list(out_indices)
        self.pretrain_grid = pretrain_img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pretrain_grid**2 + 1, embed_dim))
        rates = torch.linspace(0, drop_path, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                drop_path=rates[i],
                layer_scale_init=layer_scale_init,
                window=i in self.window_blocks,
                num_windows=window_grid**2,
            )
            for i in range(depth)
        )
        #: channels and stride of each output map
        self.out_channels: list[int] = [embed_dim] * len(self.out_indices)
        self.strides: list[int] = [patch_size] * len(self.out_indices)
        #: input sides must be multiples of this
        self.size_divisibility = patch_size * window_grid
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def num_layers(self) -> int:
        """Depth counted by layer-wise lr decay: up to the last output block (``out_indices[-1] + 1``, official)."""
        return max(self.out_indices) + 1

    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay depth of parameter ``name`` (relative to this module), as the official
        ``get_vit_lr_decay_rate``: 0 for the patch and position embeddings, ``i + 1`` for ``blocks.i``,
        ``num_layers + 1`` otherwise."""
        if name.startswith(("pos_embed", "patch_embed.")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers + 1

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) trained without weight decay, as the official code: those
        containing gamma, pos_embed, rel_pos, bias or norm."""
        words = ("gamma", "pos_embed", "rel_pos", "bias", "norm")
        return {name for name, _ in self.named_parameters() if any(word in name for word in words)}

    def abs_pos(self, hw: tuple[int, int]) -> Tensor:
        """Position embedding for an ``hw`` token map, ``(1, h, w, D)``: the pretraining grid (class slot dropped)
        bicubic-interpolated (``align_corners=False``) when the size differs."""
        g = self.pretrain_grid
        pos = self.pos_embed[:, 1:].reshape(1, g, g, -1)
        # when tracing for ONNX, always interpolate: the comparison would fix the example size's branch in the graph
        if torch.jit.is_tracing() or (g, g) != tuple(hw):
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=hw, mode="bicubic", align_corners=False)
            pos = pos.permute(0, 2, 3, 1)
        return pos

    def forward(self, images: Tensor) -> list[Tensor]:
        """``(B, 3, H, W)`` -> list of ``(B, D, H/p, W/p)`` per ``out_indices``."""
        div = self.size_divisibility
        if images.shape[-2] % div or images.shape[-1] % div:
            raise ValueError(
                f"ViT input sides must be multiples of {div} (patch {self.patch_size} x {self.window_grid} windows "
                f"per side), got {tuple(images.shape[-2:])}; resize or pad the images"
            )
        x = self.patch_embed(images)
        hw = (x.shape[1], x.shape[2])
        x = x + self.abs_pos(hw)
        x = window_partition(x, self.window_grid)
        outs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.out_indices:
                # (B, D, h, w) in channels-last memory: a free view that the projector's convolutions run fastest on
                outs.append(window_unpartition(x, self.window_grid, hw).permute(0, 3, 1, 2))
        return [outs[sorted(self.out_indices).index(i)] for i in self.out_indices]
