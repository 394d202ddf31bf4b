"""LW-DETR detector: official parameter counts and keys, optimizer groups, inference, Group DETR at eval."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CONFIGS
from detkit.config import compose
from detkit.engine.optim import param_groups
from detkit.models.build import build_model

SIZES = ("tiny", "small", "medium", "large", "xlarge")
#: README / measured on the official code: all parameters (13 groups) and the inference model (group 0)
OFFICIAL_PARAMS = {
    "tiny": (12_052_002, 9_072_366),
    "small": (14_557_378, 10_953_742),
    "medium": (28_237_378, 24_633_742),
    "large": (46_823_650, 39_656_494),
    "xlarge": (118_033_378, 110_866_222),
}


def build(size: str, *overrides: str, meta: bool = False):
    cfg = compose(CONFIGS / f"lwdetr_{size}_coco.yaml", list(overrides))
    if meta:
        with torch.device("meta"):
            return build_model(cfg.model), cfg
    return build_model(cfg.model), cfg


@pytest.mark.parametrize("size", SIZES)
def test_parameter_counts_and_official_keys(shared, size):
    full, _ = build(size, meta=True)
    single, _ = build(size, "model.group_detr=1", meta=True)
    counts = (sum(p.numel() for p in full.parameters()), sum(p.numel() for p in single.parameters()))
    assert counts == OFFICIAL_PARAMS[size]
    ref = json.loads((shared / f"reference/state_dicts/lwdetr_{size}.json").read_text())
    assert ref.pop("__num_params__") == OFFICIAL_PARAMS[size][0]
    renamed = {k.replace("backbone.0.encoder.", "backbone.").replace("backbone.0.projector.", "neck."): v
               for k, v in ref.items()}
    assert [(k, list(v.shape)) for k, v in full.state_dict().items()] == list(renamed.items())


def test_param_groups_follow_the_official_rules():
    model, cfg = build("tiny", "model.group_detr=2")
    train = dict(cfg.train)
    assert (train["lr_vit_layer_decay"], train["lr_component_decay"]) == (0.8, 0.7)
    groups = param_groups(model, train)
    by_param = {}
    for g in groups:
        assert {"params", "lr", "weight_decay", "name"} <= set(g)
        for p in g["params"]:
            assert id(p) not in by_param
            by_param[id(p)] = (g["lr"], g["weight_decay"])
    named = dict(model.named_parameters())
    assert set(by_param) == {id(p) for p in named.values()}
    enc = 1.5e-4 * 0.7**2

    def lr_wd(name):
        return by_param[id(named[name])]

    # L = out_indices[-1] + 1 = 6: pos_embed/patch_embed layer 0, blocks.i layer i + 1
    assert lr_wd("backbone.pos_embed") == pytest.approx((enc * 0.8**7, 0.0))
    assert lr_wd("backbone.patch_embed.proj.weight") == pytest.approx((enc * 0.8**7, 1e-4))
    assert lr_wd("backbone.patch_embed.proj.bias") == pytest.approx((enc * 0.8**7, 0.0))
    assert lr_wd("backbone.blocks.0.attn.qkv.weight") == pytest.approx((enc * 0.8**6, 1e-4))
    assert lr_wd("backbone.blocks.5.mlp.fc1.weight") == pytest.approx((enc * 0.8**1, 1e-4))
    for name in ("backbone.blocks.3.gamma_1", "backbone.blocks.3.norm2.weight", "backbone.blocks.3.attn.q_bias"):
        assert lr_wd(name) == pytest.approx((enc * 0.8**3, 0.0))
    assert lr_wd("transformer.decoder.layers.0.linear1.weight") == pytest.approx((1e-4 * 0.7, 1e-4))
    assert lr_wd("transformer.decoder.norm.bias") == pytest.approx((1e-4 * 0.7, 1e-4))
    for name in ("neck.stages.0.1.bias", "class_embed.weight", "query_feat.weight", "transformer.enc_output.1.weight"):
        assert lr_wd(name) == pytest.approx((1e-4, 1e-4))
    # frozen parameters are left out
    model.backbone.pos_embed.requires_grad_(False)
    assert all(p is not model.backbone.pos_embed for g in param_groups(model, train) for p in g["params"])


def test_eval_640_batch1_and_padded_batches():
    torch.manual_seed(0)
    model, _ = build("tiny")
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 640, 640), torch.zeros(1, 640, 640, dtype=torch.bool))
        assert out["pred_logits"].shape == (1, 100, 91) and out["pred_boxes"].shape == (1, 100, 4)
        assert len(out["aux_outputs"]) == 2 and out["enc_outputs"]["pred_boxes"].shape == (1, 100, 4)
        assert torch.isfinite(out["pred_boxes"]).all()
        res = model.postprocessor(out, torch.tensor([[480, 640]]))
        assert res[0]["boxes"].shape == (100, 4) and res[0]["labels"].dtype == torch.int64

        # a padded batch of two sizes; sides that are not multiples of 64 get padded by the model itself
        a, b = torch.randn(3, 256, 320), torch.randn(3, 200, 250)
        imgs = torch.zeros(2, 3, 256, 320)
        mask = torch.ones(2, 256, 320, dtype=torch.bool)
        imgs[0], mask[0] = a, False
        imgs[1, :, :200, :250], mask[1, :200, :250] = b, False
        out2 = model(imgs, mask)
        assert out2["pred_boxes"].shape == (2, 100, 4) and torch.isfinite(out2["pred_logits"]).all()
        alone = model(b[None], torch.zeros(1, 200, 250, dtype=torch.bool))
        padded = torch.zeros(1, 3, 256, 256)
        padded[0, :, :200, :250] = b
        pmask = torch.ones(1, 256, 256, dtype=torch.bool)
        pmask[0, :200, :250] = False
        torch.testing.assert_close(alone["pred_boxes"], model(padded, pmask)["pred_boxes"])


def test_training_uses_all_groups_and_eval_only_group0():
    torch.manual_seed(0)
    model, _ = build("tiny", "model.group_detr=3", "model.num_queries=20")
    with torch.no_grad():  # official init makes groups' heads identical and the box head zero: perturb
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(1, 3, 128, 128)
    mask = torch.zeros(1, 128, 128, dtype=torch.bool)
    model.train()
    model.neck.eval()  # batch norm would use batch statistics in training; everything else is deterministic
    train_out = model(x, mask)
    assert train_out["pred_logits"].shape == (1, 60, 91)
    assert train_out["enc_outputs"]["pred_logits"].shape == (1, 60, 91)
    model.eval()
    with torch.no_grad():
        eval_out = model(x, mask)
    assert eval_out["pred_logits"].shape == (1, 20, 91)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(eval_out[key], train_out[key][:, :20], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(eval_out["enc_outputs"][key], train_out["enc_outputs"][key][:, :20],
                                   atol=1e-5, rtol=1e-4)
    # the other groups really differ (their heads and queries were perturbed independently)
    assert not torch.allclose(train_out["pred_boxes"][:, 20:40], train_out["pred_boxes"][:, :20])


def test_too_few_positions_for_the_queries_is_a_clear_error():
    model, _ = build("tiny", "model.group_detr=1")
    model.eval()
    with pytest.raises(ValueError, match="fewer than num_queries=100"):
        model(torch.randn(1, 3, 128, 128), torch.zeros(1, 128, 128, dtype=torch.bool))


def test_width_mismatch_is_a_config_error():
    from detkit.errors import ConfigError

    with pytest.raises(ConfigError, match="widths disagree"):
        build("tiny", "model.neck.out_channels=128", meta=True)
