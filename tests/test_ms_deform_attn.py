"""Multi-scale deformable attention: the pure-PyTorch path against a direct per-point bilinear computation."""

from __future__ import annotations

import math

import pytest
import torch

from detkit.ops.ms_deform_attn import MSDeformAttn, ms_deform_attn


def bilinear(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """``img (C, h, w)`` sampled at normalised ``(x, y)`` (align_corners=False, zeros outside), one point."""
    c, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = img.new_zeros(c)
    for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
        for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
            if 0 <= xi < w and 0 <= yi < h:
                out = out + img[:, yi, xi] * (wx * wy)
    return out


def direct(value, shapes, locs, weights):
    """Loop over every batch, query, head, level and point."""
    bs, _, nh, hd = value.shape
    _, nq, _, nl, npnt, _ = locs.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    rows = []
    for b in range(bs):
        for q in range(nq):
            heads = []
            for m in range(nh):
                acc = value.new_zeros(hd)
                for lvl, (h, w) in enumerate(shapes):
                    img = value[b, starts[lvl] : starts[lvl + 1], m].t().reshape(hd, h, w)
                    for p in range(npnt):
                        x, y = locs[b, q, m, lvl, p].detach().tolist()
                        acc = acc + weights[b, q, m, lvl, p] * bilinear(img, x, y)
                heads.append(acc)
            rows.append(torch.cat(heads))
    return torch.stack(rows).view(bs, nq, nh * hd)


def test_matches_direct_bilinear_values_and_value_gradients():
    torch.manual_seed(0)
    shapes = [(5, 7), (3, 2)]
    bs, nq, nh, hd, npnt = 2, 3, 2, 4, 3
    s = sum(h * w for h, w in shapes)
    value = torch.randn(bs, s, nh, hd, dtype=torch.float64, requires_grad=True)
    locs = torch.rand(bs, nq, nh, len(shapes), npnt, 2, dtype=torch.float64) * 1.4 - 0.2  # some fall outside
    weights = torch.rand(bs, nq, nh, len(shapes), npnt, dtype=torch.float64, requires_grad=True)
    out = ms_deform_attn(value, shapes, locs, weights)
    ref = direct(value, shapes, locs, weights)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    gv, gw = torch.autograd.grad((out * g).sum(), (value, weights))
    rv, rw = torch.autograd.grad((ref * g).sum(), (value, weights))
    torch.testing.assert_close(gv, rv)
    torch.testing.assert_close(gw, rw)


def test_location_gradients_match_finite_differences():
    torch.manual_seed(1)
    shapes = [(4, 6), (2, 3)]
    s = sum(h * w for h, w in shapes)
    value = torch.randn(1, s, 2, 3, dtype=torch.float64)
    # keep points away from pixel-centre lines where bilinear is not differentiable
    locs = (torch.rand(1, 2, 2, 2, 2, 2, dtype=torch.float64) * 0.6 + 0.2).requires_grad_()
    weights = torch.rand(1, 2, 2, 2, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda loc: ms_deform_attn(value, shapes, loc, weights), (locs,))


def test_module_box_references_and_padding_mask():
    torch.manual_seed(2)
    d, nh, nl, npnt = 32, 4, 2, 2
    attn = MSDeformAttn(d, nl, nh, npnt).double()
    with torch.no_grad():  # official init has zero attention weights; make them non-uniform
        attn.attention_weights.weight.normal_(0, 0.5)
        attn.sampling_offsets.weight.normal_(0, 0.2)
    shapes = [(6, 6), (3, 3)]
    s = 45
    bs, nq = 2, 5
    query = torch.randn(bs, nq, d, dtype=torch.float64)
    ref = torch.rand(bs, nq, nl, 4, dtype=torch.float64) * 0.5 + 0.25
    value = torch.randn(bs, s, d, dtype=torch.float64)
    mask = torch.zeros(bs, s, dtype=torch.bool)
    mask[1, 30:36] = True  # last row of level 0 of image 1
    out = attn(query, ref, value, shapes, mask)

    # the same thing by hand: locations = ref_xy + offset / P * ref_wh / 2, softmax over L*P per head
    v = attn.value_proj(value).masked_fill(mask[..., None], 0).view(bs, s, nh, d // nh)
    off = attn.sampling_offsets(query).view(bs, nq, nh, nl, npnt, 2)
    w = attn.attention_weights(query).view(bs, nq, nh, nl * npnt).softmax(-1).view(bs, nq, nh, nl, npnt)
    loc = ref[:, :, None, :, None, :2] + off / npnt * ref[:, :, None, :, None, 2:] * 0.5
    torch.testing.assert_close(out, attn.output_proj(direct(v, shapes, loc, w)))

    # values at padded positions do not matter
    value2 = value.clone()
    value2[1, 30:36] += 100.0
    torch.testing.assert_close(attn(query, ref, value2, shapes, mask), out)


def test_point_references_scale_offsets_by_level_size():
    attn = MSDeformAttn(16, 1, 2, 1).double()
    shapes = [(4, 8)]
    query = torch.zeros(1, 1, 16, dtype=torch.float64)
    ref = torch.full((1, 1, 1, 2), 0.5, dtype=torch.float64)
    value = torch.randn(1, 32, 16, dtype=torch.float64)
    out = attn(query, ref, value, shapes)
    # init offsets: head 0 -> (+1, 0), head 1 -> (-1, 0) (cos/sin of 0 and pi, normalised by max abs)
    v = attn.value_proj(value).view(1, 32, 2, 8)
    loc = torch.tensor([[0.5 + 1 / 8, 0.5], [0.5 - 1 / 8, 0.5]], dtype=torch.float64).view(1, 1, 2, 1, 1, 2)
    torch.testing.assert_close(out, attn.output_proj(direct(v, shapes, loc, torch.ones(1, 1, 2, 1, 1).double())))


def test_official_offset_init():
    attn = MSDeformAttn(64, 2, 8, 3)
    bias = attn.sampling_offsets.bias.view(8, 2, 3, 2)
    # head 1 points at 45 degrees: (1, 1) after dividing by the max abs value; point p scaled by p + 1
    torch.testing.assert_close(bias[1, 0, 2], torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(bias[2, 1, 1], torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.sampling_offsets.weight.abs().sum() == 0


def test_traces_without_graph_breaks():
    torch._dynamo.reset()
    shapes = [(4, 4), (2, 2)]
    value = torch.randn(1, 20, 2, 4)
    locs = torch.rand(1, 3, 2, 2, 2, 2)
    weights = torch.rand(1, 3, 2, 2, 2)
    explanation = torch._dynamo.explain(ms_deform_attn)(value, shapes, locs, weights)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


@pytest.mark.parametrize("bad", [[(4, 4)], [(4, 4), (2, 2), (1, 1)]])
def test_level_count_mismatch_is_an_error(bad):
    with pytest.raises(ValueError, match="spatial shapes"):
        ms_deform_attn(torch.randn(1, 20, 2, 4), bad, torch.rand(1, 3, 2, 2, 2, 2), torch.rand(1, 3, 2, 2, 2))
