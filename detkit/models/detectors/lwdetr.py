"""LW-DETR detector (Atten4Vis/LW-DETR): ViT -> multi-scale projector -> two-stage lite deformable decoder.

State-dict keys equal the official ones up to two prefixes: ``backbone.0.encoder.`` is ``backbone.`` and
``backbone.0.projector.`` is ``neck.`` (see :mod:`detkit.weights.formats.lwdetr`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from detkit.errors import ConfigError
from detkit.models.layers import MLP, downsample_mask
from detkit.models.transformers.lwdetr import compose_boxes
from detkit.registry import BACKBONES, DETECTORS, LOSSES, MATCHERS, NECKS, POSTPROCESSORS, TRANSFORMERS

__all__ = ["LWDETR", "lwdetr"]


class LWDETR(nn.Module):
    """LW-DETR: sigmoid class logits and box-reparameterised boxes for ``num_queries`` queries per image.

    ``forward(images (B, 3, H, W), mask (B, H, W) True = padding) -> dict`` with ``pred_logits (B, Q, C)``,
    ``pred_boxes (B, Q, 4)`` (cxcywh normalised by the unpadded size), ``aux_outputs`` (one dict per intermediate
    decoder layer) and ``enc_outputs`` (two-stage logits and boxes). During training ``Q = num_queries *
    group_detr`` (all groups, in order), in eval mode ``Q = num_queries`` (group 0). Inputs whose sides are not
    multiples of the backbone's ``size_divisibility`` are padded bottom/right (marked as padding).

    :param backbone: module with ``out_channels``/``strides``, ``(B, 3, H, W) -> list of maps``.
    :param neck: multi-scale projector, ``list of maps -> list of (B, d, h_l, w_l)``.
    :param transformer: :class:`~detkit.models.transformers.lwdetr.LWDETRTransformer`.
    :param criterion: loss module (``criterion(outputs, targets) -> dict``).
    :param postprocessor: ``postprocessor(outputs, orig_sizes) -> list of dicts``.
    :param num_classes: sigmoid classes ``C``.
    :param num_queries: queries per group.
    :param group_detr: query groups during training.
    :param aux_loss: return ``aux_outputs``.
    """

    #: the learning-rate policy of :mod:`detkit.engine.optim` (layer-wise decay over the backbone's declared layers,
    #: component decay on the decoder) and the parts it names
    lr_policy = "layer_decay"
    lr_parts = {"backbone": "backbone", "decoder": "transformer.decoder"}

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        transformer: nn.Module,
        criterion: nn.Module,
        postprocessor: nn.Module,
        num_classes: int = 91,
        num_queries: int = 300,
        group_detr: int = 13,
        aux_loss: bool = True,
    ) -> None:
        super().__init__()
        d = transformer.d_model
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.group_detr = group_detr
        self.aux_loss = aux_loss
        self.transformer = transformer
        self.class_embed = nn.Linear(d, num_classes)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.refpoint_embed = nn.Embedding(num_queries * group_detr, 4)
        self.query_feat = nn.Embedding(num_queries * group_detr, d)
        self.backbone = backbone
        self.neck = neck
        self.criterion = criterion
        self.postprocessor = postprocessor
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Official init: class prior 0.01, zero last box layer, zero reference offsets; the two-stage heads of
        every group start as copies of the main heads."""
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        nn.init.zeros_(self.refpoint_embed.weight)
        enc_cls = getattr(self.transformer, "enc_out_class_embed", None)
        enc_box = getattr(self.transformer, "enc_out_bbox_embed", None)
        with torch.no_grad():
            for heads, main in ((enc_cls, self.class_embed), (enc_box, self.bbox_embed)):
                for head in heads or []:
                    for p, q in zip(head.parameters(), main.parameters(), strict=True):
                        p.copy_(q)

    # ------------------------------------------------------------------------------------------------------------
    def forward(self, images: Tensor, mask: Tensor | None = None) -> dict[str, Any]:
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        images, mask = self._pad(images, mask)
        feats = self.neck(self.backbone(images))
        masks = [downsample_mask(mask, f.shape[-2:]) for f in feats]
        groups = self.group_detr if self.training else 1
        rows = self.num_queries * groups
        hs, ref, hs_enc, ref_enc = self.transformer(
            feats, masks, self.refpoint_embed.weight[:rows], self.query_feat.weight[:rows]
        )
        coords = compose_boxes(self.bbox_embed(hs), ref[None])  # (layers, B, N, 4)
        logits = self.class_embed(hs)
        out: dict[str, Any] = {"pred_logits": logits[-1], "pred_boxes": coords[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], coords[:-1])]
        enc_heads = self.transformer.enc_out_class_embed
        enc_logits = torch.cat([enc_heads[g](x) for g, x in enumerate(hs_enc.chunk(groups, dim=1))], dim=1)
        out["enc_outputs"] = {"pred_logits": enc_logits, "pred_boxes": ref_enc}
        return out

    def _pad(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Pad bottom/right to a multiple of the backbone's ``size_divisibility``; the extra pixels are padding."""
        div = getattr(self.backbone, "size_divisibility", 1)
        h, w = images.shape[-2:]
        ph, pw = (-h) % div, (-w) % div
        if ph or pw:
            images = F.pad(images, (0, pw, 0, ph))
            mask = F.pad(mask, (0, pw, 0, ph), value=True)
        return images, mask


@DETECTORS.register("lwdetr")
def lwdetr(
    backbone: dict,
    neck: dict,
    transformer: dict,
    matcher: dict,
    loss: dict,
    postprocessor: dict,
    num_classes: int = 91,
    hidden_dim: int = 256,
    num_queries: int = 300,
    group_detr: int = 13,
    aux_loss: bool = True,
) -> LWDETR:
    """Build LW-DETR: ViT ``backbone``, projector ``neck``, ``transformer``, ``matcher`` + ``loss`` (the criterion)
    and ``postprocessor``.

    Injected values: the neck gets ``in_channels``/``in_stride`` from the backbone; the transformer gets
    ``num_levels`` (neck outputs), ``num_queries``, ``group_detr`` and ``num_classes``; the loss gets the built
    ``matcher``, ``num_classes`` and ``group_detr``. ``hidden_dim`` must equal the neck's ``out_channels`` and the
    transformer's ``d_model`` (the presets interpolate it into both).
    """
    if group_detr < 1 or num_queries < 1:
        raise ConfigError(f"group_detr and num_queries must be >= 1, got {group_detr} and {num_queries}")
    backbone_module = BACKBONES.build(backbone)
    strides = set(backbone_module.strides)
    if len(strides) != 1:
        raise ConfigError(
            f"the multi-scale projector needs backbone outputs of one stride, got {backbone_module.strides}"
        )
    neck_module = NECKS.build(neck, in_channels=list(backbone_module.out_channels),
                              in_stride=backbone_module.strides[0])
    transformer_module = TRANSFORMERS.build(
        transformer,
        num_levels=len(neck_module.out_channels),
        num_queries=num_queries,
        group_detr=group_detr,
        num_classes=num_classes,
    )
    widths = {"model.hidden_dim": hidden_dim, "neck out_channels": neck_module.out_channels[0],
              "transformer d_model": transformer_module.d_model}
    if len(set(widths.values())) != 1:
        raise ConfigError(f"widths disagree: {widths}; set them all from model.hidden_dim")
    matcher_module = MATCHERS.build(matcher)
    criterion = LOSSES.build(loss, matcher=matcher_module, num_classes=num_classes, group_detr=group_detr)
    postprocessor_module = POSTPROCESSORS.build(postprocessor)
    return LWDETR(backbone_module, neck_module, transformer_module, criterion, postprocessor_module,
                  num_classes=num_classes, num_queries=num_queries, group_detr=group_detr, aux_loss=aux_loss)
