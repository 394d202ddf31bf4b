"""LW-DETR ViT backbone: window organisation, attention, position embedding, outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath

from detkit.models.backbones.vit import Attention, Block, Mlp, ViT, window_partition, window_unpartition
from detkit.registry import BACKBONES


def test_window_partition_is_window_major_and_invertible():
    x = torch.randn(2, 8, 12, 5)  # 4x4 windows of 2x3 tokens
    win = window_partition(x, 4)
    assert win.shape == (32, 6, 5)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                expected = x[b, 2 * i : 2 * i + 2, 3 * j : 3 * j + 3].reshape(6, 5)
                torch.testing.assert_close(win[b * 16 + i * 4 + j], expected)
    torch.testing.assert_close(window_unpartition(win, 4, (8, 12)), x)


def test_attention_has_no_k_bias_and_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(12, 3)
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(2, 5, 12)
    w_q, w_k, w_v = attn.qkv.weight.chunk(3)
    q = (x @ w_q.t() + attn.q_bias).view(2, 5, 3, 4).transpose(1, 2)
    k = (x @ w_k.t()).view(2, 5, 3, 4).transpose(1, 2)
    v = (x @ w_v.t() + attn.v_bias).view(2, 5, 3, 4).transpose(1, 2)
    a = ((q * 4**-0.5) @ k.transpose(-1, -2)).softmax(-1)
    expected = attn.proj((a @ v).transpose(1, 2).reshape(2, 5, 12))
    torch.testing.assert_close(attn(x), expected)


def test_mlp_in_place_gelu_without_autograd_equals_the_autograd_path():
    """Without autograd the GELU runs in place on fc1's output; values equal the exact-GELU MLP computed with
    autograd, whose gradients still flow."""
    torch.manual_seed(0)
    mlp = Mlp(8, 32)
    x = torch.randn(2, 5, 8, requires_grad=True)
    expected = mlp.fc2(F.gelu(mlp.fc1(x)))
    out = mlp(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert x.grad is not None and mlp.fc1.weight.grad is not None
    with torch.inference_mode():
        torch.testing.assert_close(mlp(x.detach()), expected.detach())


@pytest.mark.parametrize("window", [True, False])
def test_window_blocks_attend_inside_windows_only(window):
    torch.manual_seed(0)
    blk = Block(8, 2, window=window, num_windows=4).eval()
    with torch.no_grad():  # the official init (std 0.02, layer scale 0.1) makes cross-token effects tiny
        for p in blk.parameters():
            p.uniform_(-0.5, 0.5)
    x = torch.randn(2 * 4, 6, 8)  # 2 images x 4 windows x 6 tokens
    y = blk(x)
    x2 = x.clone()
    x2[1, 0] += torch.randn(8)  # image 0, window 1 (not a constant: LayerNorm would remove it)
    changed = (blk(x2) - y).abs().amax(dim=(1, 2)) > 1e-6
    if window:
        assert changed.tolist() == [i == 1 for i in range(8)]
    else:  # the whole image 0 sees it, image 1 does not
        assert changed.tolist() == [True] * 4 + [False] * 4


def test_block_layer_scale_and_drop_path_schedule():
    vit = ViT(embed_dim=24, depth=4, num_heads=2, window_blocks=[0, 2], out_indices=[1, 3], drop_path=0.3)
    rates = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in vit.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert not isinstance(vit.blocks[0].drop_path, DropPath)
    assert [b.window for b in vit.blocks] == [True, False, True, False]
    torch.testing.assert_close(vit.blocks[2].gamma_1.detach(), torch.full((24,), 0.1))


def test_position_embedding_is_bicubic_interpolated_from_pretraining_grid():
    vit = ViT(embed_dim=16, depth=2, num_heads=2, window_blocks=[0], out_indices=[1])
    grid = vit.pos_embed[:, 1:].reshape(1, 14, 14, 16).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(vit.abs_pos((8, 4)), expected)
    torch.testing.assert_close(vit.abs_pos((14, 14)), grid.permute(0, 2, 3, 1))  # the class slot is dropped


def test_forward_outputs_and_equivalence_with_raster_global_attention():
    torch.manual_seed(0)
    vit = ViT(embed_dim=24, depth=3, num_heads=2, window_blocks=[0], out_indices=[2, 1]).eval()
    x = torch.randn(2, 3, 128, 192)
    outs = vit(x)
    assert [tuple(o.shape) for o in outs] == [(2, 24, 8, 12), (2, 24, 8, 12)]
    assert vit.out_channels == [24, 24] and vit.strides == [16, 16]

    # independent computation in raster order: window block on explicit 2x3-token windows, global blocks on all
    t = vit.patch_embed(x) + vit.abs_pos((8, 12))
    b0 = vit.blocks[0]
    wins = t.view(2, 4, 2, 4, 3, 24).permute(0, 1, 3, 2, 4, 5).reshape(32, 6, 24)
    wins = wins + b0.gamma_1 * b0.attn(b0.norm1(wins))
    wins = wins + b0.gamma_2 * b0.mlp(b0.norm2(wins))
    t = wins.view(2, 4, 4, 2, 3, 24).permute(0, 1, 3, 2, 4, 5).reshape(2, 96, 24)
    feats = []
    for blk in vit.blocks[1:]:
        t = t + blk.gamma_1 * blk.attn(blk.norm1(t))
        t = t + blk.gamma_2 * blk.mlp(blk.norm2(t))
        feats.append(t.view(2, 8, 12, 24).permute(0, 3, 1, 2))
    torch.testing.assert_close(outs[0], feats[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs[1], feats[0], atol=1e-5, rtol=1e-4)


def test_sides_must_be_multiples_of_64():
    vit = ViT(embed_dim=16, depth=2, num_heads=2, window_blocks=[0], out_indices=[1])
    with pytest.raises(ValueError, match="multiples of 64"):
        vit(torch.randn(1, 3, 96, 128))


def test_registered_and_state_dict_keys_match_official_names(shared):
    import json

    vit = BACKBONES.build({"type": "vit", "embed_dim": 192, "depth": 6, "num_heads": 12,
                           "window_blocks": [0, 2, 4], "out_indices": [1, 3, 5]})
    ref = json.loads((shared / "reference/state_dicts/lwdetr_tiny.json").read_text())
    official = {k[len("backbone.0.encoder."):]: v for k, v in ref.items() if k.startswith("backbone.0.encoder.")}
    assert {k: list(v.shape) for k, v in vit.state_dict().items()} == official
    with pytest.raises(ValueError, match="outside"):
        ViT(depth=2, window_blocks=[0], out_indices=[2])
