"""Builders of the benchmarked models: detkit (from its configs) and the HuggingFace transformers equivalents.

HF equivalents (random init, no download):

- DETR-R50: ``DetrForObjectDetection(DetrConfig(use_pretrained_backbone=False, use_timm_backbone=False,
  backbone_config=None, num_labels=91, auxiliary_loss=True, attention_dropout=0.1, activation_dropout=0.1))`` (HF's
  own ResNet-50 with frozen BN, stem and first stage frozen, post-norm 6+6 transformer, auxiliary decoder losses and
  the official dropout 0.1 on residuals, attention weights and FFN activations).
- LW-DETR tiny / small: ``LwDetrForObjectDetection(LwDetrConfig(backbone_config=LwDetrViTConfig(...),
  projector_scale_factors=[1.0], num_queries=Q, decoder_n_points=2, num_labels=91))``. HF counts ViT outputs as
  stages (``stage0`` = patch embedding), so the official block indices ``out_indices`` become ``i + 1``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]

#: detkit config and official ViT settings per LW-DETR variant
LWDETR_VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": {"config": "lwdetr_tiny_coco.yaml", "depth": 6, "window": [0, 2, 4], "out": [1, 3, 5], "queries": 100},
    "small": {"config": "lwdetr_small_coco.yaml", "depth": 10, "window": [0, 1, 3, 6, 7, 9], "out": [2, 4, 5, 9],
              "queries": 300},
}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_detkit(config: str, overrides: list[str] | None = None, device: str = "cpu") -> nn.Module:
    """A detkit detector from ``configs/<config>`` with random weights (seeded)."""
    from detkit import build_model, compose

    torch.manual_seed(0)
    cfg = compose(REPO / "configs" / config, overrides or [])
    return build_model(cfg.model).to(device)


def build_hf_detr(device: str = "cpu") -> nn.Module:
    from transformers import DetrConfig, DetrForObjectDetection

    torch.manual_seed(0)
    # the official DETR's dropout 0.1 also drops attention weights (nn.MultiheadAttention) and FFN activations;
    # HF's defaults leave both at 0
    cfg = DetrConfig(use_pretrained_backbone=False, use_timm_backbone=False, backbone_config=None, num_labels=91,
                     auxiliary_loss=True, attention_dropout=0.1, activation_dropout=0.1)
    return DetrForObjectDetection(cfg).to(device)


def build_hf_lwdetr(variant: str, image_size: int = 640, device: str = "cpu") -> nn.Module:
    from transformers import LwDetrConfig, LwDetrForObjectDetection, LwDetrViTConfig

    v = LWDETR_VARIANTS[variant]
    torch.manual_seed(0)
    vit = LwDetrViTConfig(hidden_size=192, num_hidden_layers=v["depth"], num_attention_heads=12,
                          window_block_indices=v["window"], out_indices=[i + 1 for i in v["out"]],
                          image_size=image_size)
    cfg = LwDetrConfig(backbone_config=vit, projector_scale_factors=[1.0], num_queries=v["queries"],
                       decoder_n_points=2, num_labels=91, group_detr=13)
    return LwDetrForObjectDetection(cfg).to(device)


@dataclass
class Pair:
    """One benchmark case: the detkit model and its HF peer, plus callables running one forward of each."""

    name: str
    detkit: nn.Module
    hf: nn.Module | None
    images: torch.Tensor
    mask: torch.Tensor

    def detkit_fn(self, model: nn.Module | None = None) -> Callable[[], Any]:
        m = model if model is not None else self.detkit
        images, mask = self.images, self.mask
        return lambda: m(images, mask)

    def hf_fn(self) -> Callable[[], Any]:
        assert self.hf is not None
        m, images, pixel_mask = self.hf, self.images, (~self.mask).long()
        return lambda: m(pixel_values=images, pixel_mask=pixel_mask)


def inference_pair(case: str, height: int, width: int, batch: int = 1, device: str = "cpu",
                   with_hf: bool = True) -> Pair:
    """``case``: ``detr_r50``, ``lwdetr_tiny`` or ``lwdetr_small``; models in eval mode."""
    torch.manual_seed(0)
    images = torch.randn(batch, 3, height, width, device=device)
    mask = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
    if case == "detr_r50":
        dk = build_detkit("detr_r50.yaml", device=device)
        hf = build_hf_detr(device) if with_hf else None
    elif case.startswith("lwdetr_"):
        variant = case.split("_", 1)[1]
        dk = build_detkit(LWDETR_VARIANTS[variant]["config"], device=device)
        hf = build_hf_lwdetr(variant, image_size=max(height, width), device=device) if with_hf else None
    else:
        raise ValueError(f"unknown case {case!r}")
    dk.eval()
    if hf is not None:
        hf.eval()
    return Pair(case, dk, hf, images, mask)
