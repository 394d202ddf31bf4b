"""The assembled DETR: parameter counts, configs, padding, training on CPU, eval at full size."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.utils import clip_grad_norm_

from detkit import build_model, compose
from detkit.engine.optim import param_groups
from detkit.errors import ConfigError
from tests.conftest import CONFIGS

#: a small DETR for CPU tests: ResNet-18, one encoder and two decoder layers, narrow FFN, no dropout
TINY = [
    "model.num_classes=5", "model.num_queries=10", "model.hidden_dim=32", "model.backbone.depth=18",
    "model.transformer.nhead=4", "model.transformer.num_encoder_layers=1", "model.transformer.num_decoder_layers=2",
    "model.transformer.dim_feedforward=64", "model.transformer.dropout=0.0",
]


def _count(model: torch.nn.Module) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


@pytest.mark.parametrize(("config", "total", "trainable", "stride"), [
    ("detr_r50.yaml", 41_524_768, 41_302_368, 32),
    ("detr_r101.yaml", 60_464_672, 60_242_272, 32),
    ("detr_r50_dc5.yaml", 41_524_768, 41_302_368, 16),
    ("detr_r101_dc5.yaml", 60_464_672, 60_242_272, 16),
])
def test_parameter_counts_equal_official(config: str, total: int, trainable: int, stride: int, shared) -> None:
    cfg = compose(CONFIGS / config)
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert _count(model) == (total, trainable)
    variant = "detr_r101" if "r101" in config else "detr_r50"
    official = json.loads((shared / f"reference/state_dicts/{variant}.json").read_text())
    assert official["__num_params__"] == total
    assert len(model.state_dict()) == len(official) - 1
    assert model.backbone.strides == [stride]
    assert model.num_classes == 91


def test_config_schedule_and_data() -> None:
    cfg = compose(CONFIGS / "detr_r50.yaml")
    assert (cfg.train.epochs, cfg.train.lr_drop, cfg.train.batch_size) == (500, 400, 2)
    assert (cfg.train.lr, cfg.train.lr_backbone, cfg.train.weight_decay, cfg.train.clip_max_norm) == (
        1e-4, 1e-5, 1e-4, 0.1)
    assert cfg.data.format == "coco" and cfg.data.label_map == "coco_official"
    assert cfg.data.train_transforms.type == "detr_train" and cfg.data.val_transforms.type == "detr_val"
    short = compose(CONFIGS / "_base_/schedules/detr_300e.yaml")
    assert (short.train.epochs, short.train.lr_drop) == (300, 200)


def test_width_must_agree() -> None:
    cfg = compose(CONFIGS / "detr_r50.yaml", [*TINY, "model.transformer.d_model=64"])
    with pytest.raises(ConfigError, match="width"):
        build_model(cfg.model)


def test_param_groups() -> None:
    cfg = compose(CONFIGS / "detr_r50.yaml", TINY)
    model = build_model(cfg.model)
    groups = param_groups(model, cfg.train)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"default", "backbone"}
    assert by_name["backbone"]["lr"] == 1e-5 and by_name["default"]["lr"] == 1e-4
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in by_name["backbone"]["params"]} == {
        id(p) for p in model.backbone.parameters() if p.requires_grad}
    no_backbone = param_groups(model, {**cfg.train, "lr_backbone": 0.0})
    assert [g["name"] for g in no_backbone] == ["default"]


def _batch() -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 96, generator=gen)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    images[1, :, :, 64:] = 0
    mask[1, :, 64:] = True  # image 1 is 64x64, padded on the right
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.4]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    return images, mask, targets


def test_training_reduces_loss_and_gradients_reach_trainable_only() -> None:
    torch.manual_seed(0)
    cfg = compose(CONFIGS / "detr_r50.yaml", [*TINY, "train.lr=1.0e-3", "train.lr_backbone=1.0e-4"])
    model = build_model(cfg.model).train()
    images, mask, targets = _batch()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train))
    losses = []
    for step in range(5):
        out = model(images, mask)
        assert out["pred_logits"].shape == (2, 10, 6) and out["pred_boxes"].shape == (2, 10, 4)
        assert len(out["aux_outputs"]) == 1
        loss_dict = model.criterion(out, targets)
        optimizer.zero_grad()
        loss_dict["loss"].backward()
        if step == 0:
            for name, p in model.named_parameters():
                if p.requires_grad:
                    assert p.grad is not None and torch.isfinite(p.grad).all(), name
                else:
                    assert p.grad is None, name
            assert any(p.grad is None for p in model.parameters())  # the frozen stem / layer1 exist
            for part in (model.backbone, model.neck, model.transformer, model.head, model.query_embed):
                assert sum(float(p.grad.abs().sum()) for p in part.parameters() if p.requires_grad) > 0
        clip_grad_norm_(model.parameters(), cfg.train.clip_max_norm)
        optimizer.step()
        losses.append(loss_dict["loss"].item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_eval_outputs_padding_mask_and_batch_independence() -> None:
    torch.manual_seed(0)
    model = build_model(compose(CONFIGS / "detr_r50.yaml", TINY).model).eval()
    images, mask, _ = _batch()
    with torch.no_grad():
        both = model(images, mask)
        second = model(images[1:], mask[1:])
        unmasked = model(images[1:], torch.zeros_like(mask[1:]))
        no_mask = model(images[1:])
    assert set(both) == {"pred_logits", "pred_boxes"}  # no aux outputs in eval
    # each image's result does not depend on the rest of the batch
    torch.testing.assert_close(both["pred_logits"][1:], second["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both["pred_boxes"][1:], second["pred_boxes"], atol=1e-5, rtol=1e-5)
    # the padding mask is used (attention and position encoding), and mask=None means "no padding"
    assert not torch.allclose(unmasked["pred_logits"], second["pred_logits"], atol=1e-3)
    torch.testing.assert_close(no_mask["pred_logits"], unmasked["pred_logits"])
    results = model.postprocessor(both, torch.tensor([[480, 720], [300, 300]]))
    assert [r["boxes"].shape for r in results] == [(10, 4), (10, 4)]
    assert float(results[1]["boxes"].max()) <= 300 * 1.5 + 1e-3  # cxcywh in [0, 1] -> xyxy within 1.5x the size


@pytest.mark.slow
def test_full_detr_r50_eval_at_800x1088_padded_batch() -> None:
    torch.manual_seed(0)
    model = build_model(compose(CONFIGS / "detr_r50.yaml").model).eval()
    images = torch.zeros(2, 3, 800, 1088)
    mask = torch.ones(2, 800, 1088, dtype=torch.bool)
    images[0] = torch.randn(3, 800, 1088)
    mask[0] = False
    images[1, :, :600, :900] = torch.randn(3, 600, 900)
    mask[1, :600, :900] = False
    with torch.no_grad():
        out = model(images, mask)
    assert out["pred_logits"].shape == (2, 100, 92) and out["pred_boxes"].shape == (2, 100, 4)
    assert torch.isfinite(out["pred_logits"]).all() and torch.isfinite(out["pred_boxes"]).all()
    results = model.postprocessor(out, torch.tensor([[800, 1088], [600, 900]]))
    assert results[1]["boxes"].shape == (100, 4) and results[1]["labels"].max() < 91
