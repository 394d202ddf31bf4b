"""LW-DETR multi-scale projector: sampling branches, C2f, channel LayerNorm, keys of the official checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from detkit.models.necks.projector import C2f, MultiScaleProjector
from detkit.registry import NECKS


def test_scales_shapes_and_strides():
    proj = MultiScaleProjector([32, 32], out_channels=24, scales=["P3", "P4", "P5", "P6"]).eval()
    feats = [torch.randn(2, 32, 8, 12) for _ in range(2)]
    outs = proj(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 24, 16, 24), (2, 24, 8, 12), (2, 24, 4, 6), (2, 24, 2, 3)]
    assert proj.strides == [8, 16, 32, 64] and proj.out_channels == [24] * 4
    # P6 is a stride-2 subsampling of the P5 output (max-pool with kernel 1), no parameters of its own
    torch.testing.assert_close(outs[3], outs[2][..., ::2, ::2])
    assert len(proj.stages) == 3


def test_p4_is_concat_then_c2f_then_channel_layernorm():
    torch.manual_seed(0)
    proj = MultiScaleProjector([8, 8, 8], out_channels=16, scales=["P4"]).eval()
    feats = [torch.randn(1, 8, 4, 4) for _ in range(3)]
    c2f, ln = proj.stages[0]
    y = c2f(torch.cat(feats, 1))
    mu, var = y.mean(1, keepdim=True), y.var(1, keepdim=True, unbiased=False)
    expected = (y - mu) / torch.sqrt(var + 1e-6) * ln.weight[:, None, None] + ln.bias[:, None, None]
    torch.testing.assert_close(proj(feats)[0], expected, atol=1e-5, rtol=1e-5)
    assert len(list(proj.stages_sampling.parameters())) == 0  # P4 sampling is the identity


def test_c2f_chains_bottlenecks_without_residual():
    torch.manual_seed(0)
    m = C2f(6, 8, n=2).eval()
    x = torch.randn(1, 6, 5, 5)
    a, b = m.cv1(x).split((4, 4), 1)
    b1 = m.m[0].cv2(m.m[0].cv1(b))
    b2 = m.m[1].cv2(m.m[1].cv1(b1))
    torch.testing.assert_close(m(x), m.cv2(torch.cat([a, b, b1, b2], 1)))
    assert isinstance(m.cv1.act, nn.SiLU) and m.cv2.conv.kernel_size == (1, 1)


@pytest.mark.parametrize("size, dim", [("tiny", 192), ("large", 384), ("xlarge", 768)])
def test_keys_and_shapes_match_official(shared, size, dim):
    ref = json.loads((shared / f"reference/state_dicts/lwdetr_{size}.json").read_text())
    official = {k[len("backbone.0.projector."):]: v for k, v in ref.items() if k.startswith("backbone.0.projector.")}
    scales = ["P4"] if size == "tiny" else ["P3", "P5"]
    width = 256 if size == "tiny" else 384
    n_in = 3 if size == "tiny" else 4
    with torch.device("meta"):
        proj = NECKS.build({"type": "multiscale_projector", "scales": scales, "out_channels": width},
                           in_channels=[dim] * n_in, in_stride=16)
    assert {k: list(v.shape) for k, v in proj.state_dict().items()} == official


def test_bad_scales_are_errors():
    with pytest.raises(ValueError, match="P3, P4, P5, P6"):
        MultiScaleProjector([8], scales=["P7"])
    with pytest.raises(ValueError, match="P6"):
        MultiScaleProjector([8], scales=["P6", "P4"])
