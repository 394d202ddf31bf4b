"""The optimizer groups of the shipped DETR and LW-DETR recipes follow the official rules of
``shared/reference/ARCHITECTURE.md``, written out here independently of :mod:`detkit.engine.optim`.

- DETR (sections 1.2, 1.7): ``lr`` for the transformer and heads, ``lr_backbone`` for the backbone, of which only
  ``layer2``..``layer4`` train (and only when ``lr_backbone > 0``); ``weight_decay`` for all groups.
- LW-DETR (section 2.9, the official ``get_vit_lr_decay_rate``): the ViT at ``lr_encoder *
  layer_decay^(L + 1 - layer_id) * component_decay^2`` with ``L = out_indices[-1] + 1``, ``layer_id`` 0 for
  ``patch_embed``/``pos_embed`` and ``i + 1`` for ``blocks.i`` (``L + 1`` otherwise), no weight decay for names with
  gamma, pos_embed, rel_pos, bias or norm; the decoder at ``lr * component_decay``; everything else at ``lr``.

Beyond the official per-parameter values, the groups keep detkit's layout (the order of groups and of parameters
inside them, and the group names), which an optimizer state saved in a checkpoint is resumed into.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from detkit import build_model, compose
from detkit.engine.optim import param_groups
from tests.conftest import CONFIGS

#: (group name, parameter names in order, lr, weight decay)
Group = tuple[str, list[str], float, float]


def _build(config: str, overrides: list[str]) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """The shipped recipe on the meta device (parameters only, no memory, no download), its model and train nodes."""
    cfg = compose(CONFIGS / config, overrides)
    with torch.device("meta"):
        model = build_model(cfg.model)
    return model, dict(cfg.train), cfg.model


def _actual(model: torch.nn.Module, train: dict[str, Any]) -> list[Group]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["name"], [names[id(p)] for p in g["params"]], g["lr"], g["weight_decay"])
            for g in param_groups(model, train)]


def _assert_same(actual: list[Group], expected: list[Group]) -> None:
    assert [(name, params) for name, params, _, _ in actual] == [(name, params) for name, params, _, _ in expected]
    for (name, _, lr, wd), (_, _, want_lr, want_wd) in zip(actual, expected, strict=True):
        assert (lr, wd) == pytest.approx((want_lr, want_wd), rel=1e-12, abs=0.0), name


def _expected_detr(model: torch.nn.Module, train: dict[str, Any]) -> list[Group]:
    names = [n for n, _ in model.named_parameters()]
    backbone = [n for n in names if n.startswith("backbone.")
                and any(f".{stage}." in n for stage in ("layer2", "layer3", "layer4"))]
    rest = [n for n in names if not n.startswith("backbone.")]
    groups = [("default", rest, train["lr"], train["weight_decay"])]
    if train["lr_backbone"] > 0:
        groups.append(("backbone", backbone, train["lr_backbone"], train["weight_decay"]))
    return groups


def _expected_lwdetr(model: torch.nn.Module, train: dict[str, Any], out_indices: list[int]) -> list[Group]:
    num_layers = out_indices[-1] + 1
    component_decay = train["lr_component_decay"]
    groups: dict[str, Group] = {}
    for name, _ in model.named_parameters():
        if name.startswith("backbone."):
            layer_id = num_layers + 1
            if ".pos_embed" in name or ".patch_embed" in name:
                layer_id = 0
            elif ".blocks." in name:
                layer_id = int(name[name.find(".blocks."):].split(".")[2]) + 1
            lr = train["lr_encoder"] * train["lr_vit_layer_decay"] ** (num_layers + 1 - layer_id) * component_decay**2
            no_decay = any(word in name for word in ("gamma", "pos_embed", "rel_pos", "bias", "norm"))
            key, wd = f"backbone.layer{layer_id}.{'no_decay' if no_decay else 'decay'}", train["weight_decay"]
            wd = 0.0 if no_decay else wd
        elif name.startswith("transformer.decoder."):
            key, lr, wd = "decoder", train["lr"] * component_decay, train["weight_decay"]
        else:
            key, lr, wd = "other", train["lr"], train["weight_decay"]
        groups.setdefault(key, (key, [], lr, wd))[1].append(name)
    return list(groups.values())


@pytest.mark.parametrize("lr_backbone", [None, 0.0])
def test_detr_r50_groups(lr_backbone):
    overrides = ["model.backbone.weights=null"] + ([] if lr_backbone is None else [f"train.lr_backbone={lr_backbone}"])
    model, train, _ = _build("detr_r50.yaml", overrides)
    assert (train["lr"], train["weight_decay"]) == (1e-4, 1e-4)
    assert train["lr_backbone"] == (1e-5 if lr_backbone is None else lr_backbone)
    _assert_same(_actual(model, train), _expected_detr(model, train))


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_lwdetr_groups(size):
    model, train, model_cfg = _build(f"lwdetr_{size}_coco.yaml", ["model.init_from=null"])
    assert (train["lr_vit_layer_decay"], train["lr_component_decay"]) == (0.8, 0.7)
    expected = _expected_lwdetr(model, train, list(model_cfg.backbone.out_indices))
    assert len(expected) > 2 * (len(model_cfg.backbone.out_indices) + 1)  # many layers, decay and no-decay
    _assert_same(_actual(model, train), expected)
    # frozen parameters are left out, the rest keeps its groups
    model.backbone.blocks[0].requires_grad_(False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    kept = [(name, [p for p in params if p not in frozen], lr, wd) for name, params, lr, wd in expected]
    _assert_same(_actual(model, train), [group for group in kept if group[1]])


def test_lwdetr_layer_decay_over_a_timm_vit(timm_plugin):
    """timm's ViT grouping (stem 0, ``blocks.i`` i + 1, 12 blocks) under LW-DETR's rule; timm's no-decay rule (1-d
    tensors, biases, the model's ``no_weight_decay()``: cls_token, pos_embed)."""
    backbone = "model.backbone={type: timm, name: vit_tiny_patch16_224, out_indices: [-1]}"
    model, train, _ = _build("lwdetr_tiny_coco.yaml", ["model.init_from=null", backbone])
    by_name = {name: (lr, wd) for _, params, lr, wd in _actual(model, train) for name in params}
    encoder, decay, weight_decay = train["lr_encoder"] * train["lr_component_decay"] ** 2, 0.8, train["weight_decay"]
    inner = "backbone.model.model."
    assert by_name[inner + "cls_token"] == pytest.approx((encoder * decay**13, 0.0))
    assert by_name[inner + "patch_embed.proj.weight"] == pytest.approx((encoder * decay**13, weight_decay))
    assert by_name[inner + "blocks.0.attn.qkv.weight"] == pytest.approx((encoder * decay**12, weight_decay))
    assert by_name[inner + "blocks.11.mlp.fc2.weight"] == pytest.approx((encoder * decay**1, weight_decay))
    assert by_name[inner + "blocks.11.norm1.weight"] == pytest.approx((encoder * decay**1, 0.0))
    assert by_name["class_embed.weight"] == pytest.approx((train["lr"], weight_decay))


def test_lwdetr_over_a_timm_model_without_layer_grouping_falls_back(timm_plugin, caplog):
    backbone = "model.backbone={type: timm, name: convnext_atto, out_indices: [-1]}"
    model, train, _ = _build("lwdetr_tiny_coco.yaml", ["model.init_from=null", backbone])
    logger = logging.getLogger("detkit.train")
    logger.addHandler(caplog.handler)  # directly: the CLI's logging setup may stop "detkit" from propagating
    try:
        groups = _actual(model, train)
    finally:
        logger.removeHandler(caplog.handler)
    assert "TimmBackbone declares no layer ids" in caplog.text
    other = next(params for name, params, _, _ in groups if name == "other")
    assert {n for n, _ in model.named_parameters() if n.startswith("backbone.")} <= set(other)
    assert [name for name, *_ in groups if name.startswith("backbone")] == []
