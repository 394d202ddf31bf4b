"""DETR: the detector module and its ``detr`` recipe."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from detkit.errors import ConfigError
from detkit.models.layers import downsample_mask
from detkit.registry import (
    BACKBONES,
    DETECTORS,
    HEADS,
    LOSSES,
    MATCHERS,
    NECKS,
    POSITION_ENCODINGS,
    POSTPROCESSORS,
    TRANSFORMERS,
)

__all__ = ["DETR", "detr"]


class DETR(nn.Module):
    """DETR (Carion et al., 2020): CNN backbone, transformer encoder-decoder, set prediction with Hungarian loss.

    State-dict keys are the official ones up to prefix renaming (see :mod:`detkit.weights.formats.detr`):
    ``backbone.body.*`` (official ``backbone.0.body.*``), ``position_encoding.*`` (``backbone.1.*``, learned only),
    ``neck.proj.*`` (``input_proj.*``), ``transformer.*``, ``query_embed.weight``, ``head.class_embed.*`` /
    ``head.bbox_embed.*`` (``class_embed.*`` / ``bbox_embed.*``).

    :param backbone: returns feature maps; exposes ``out_channels`` and ``strides``.
    :param position_encoding: ``mask (B, h, w) -> (B, d, h, w)``.
    :param neck: projects the backbone maps to ``d`` channels (only the last map is used).
    :param transformer: ``(src, mask, query_embed, pos) -> (hs (L, B, Q, d), memory)``.
    :param head: ``hs -> (logits, boxes)``.
    :param criterion: the training loss, ``criterion(outputs, targets) -> dict``.
    :param postprocessor: ``postprocessor(outputs, orig_sizes) -> list[dict]``.
    :param num_queries: number of object queries.
    :param num_classes: number of object classes (the logits have one more, no-object).
    :param aux_loss: return ``aux_outputs`` (intermediate decoder layers) when training.
    """

    #: the learning-rate policy of :mod:`detkit.engine.optim` (the backbone at its own lr) and the part it names
    lr_policy = "backbone_lr"
    lr_parts = {"backbone": "backbone"}

    def __init__(
        self,
        backbone: nn.Module,
        position_encoding: nn.Module,
        neck: nn.Module,
        transformer: nn.Module,
        head: nn.Module,
        criterion: nn.Module,
        postprocessor: nn.Module,
        num_queries: int = 100,
        num_classes: int = 91,
        aux_loss: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.position_encoding = position_encoding
        self.neck = neck
        self.transformer = transformer
        self.query_embed = nn.Embedding(num_queries, transformer.d_model)
        self.head = head
        self.criterion = criterion
        self.postprocessor = postprocessor
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.aux_loss = aux_loss

    def forward(self, images: Tensor, mask: Tensor | None = None) -> dict[str, Any]:
        """Detect objects in a padded batch.

        :param images: ``(B, 3, H, W)`` normalised images, zero-padded bottom/right.
        :param mask: ``(B, H, W)`` bool, True = padding (``None``: no padding).
        :returns: ``pred_logits (B, Q, num_classes + 1)``, ``pred_boxes (B, Q, 4)`` (cxcywh normalised by the unpadded
            image size) and, when training with ``aux_loss``, ``aux_outputs`` (one dict per earlier decoder layer).
        """
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        src = self.neck(self.backbone(images))[-1]
        feat_mask = downsample_mask(mask, src.shape[-2:])
        pos = self.position_encoding(feat_mask).to(src.dtype)
        hs, _ = self.transformer(src, feat_mask, self.query_embed.weight, pos)
        logits, boxes = self.head(hs)
        out: dict[str, Any] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.training and self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out


@DETECTORS.register("detr")
def detr(
    backbone: dict[str, Any],
    transformer: dict[str, Any],
    position_encoding: dict[str, Any] | None = None,
    neck: dict[str, Any] | None = None,
    head: dict[str, Any] | None = None,
    matcher: dict[str, Any] | None = None,
    loss: dict[str, Any] | None = None,
    postprocessor: dict[str, Any] | None = None,
    num_classes: int = 91,
    num_queries: int = 100,
    hidden_dim: int = 256,
    aux_loss: bool = True,
) -> DETR:
    """Build DETR from component nodes.

    ``hidden_dim`` is the shared width that configs interpolate into ``transformer.d_model`` and ``neck.hidden_dim``;
    the recipe checks they agree and injects the width into the position encoding (``num_pos_feats = d / 2``) and the
    head, ``num_classes`` into the head and the loss, the built matcher into the loss, and the backbone channels into
    the neck. Omitted nodes default to the official components (sine, input_proj, detr_head, hungarian,
    set_criterion, softmax).
    """
    backbone_module = BACKBONES.build(backbone)
    neck_module = NECKS.build(neck or {"type": "input_proj"}, in_channels=backbone_module.out_channels)
    transformer_module = TRANSFORMERS.build(transformer)
    d_model = int(transformer_module.d_model)
    widths = {"model.hidden_dim": hidden_dim, "transformer.d_model": d_model}
    if getattr(neck_module, "out_channels", None):
        widths["neck output channels"] = neck_module.out_channels[-1]
    if len(set(widths.values())) != 1:
        found = ", ".join(f"{name}={width}" for name, width in widths.items())
        raise ConfigError(f"detr: the model width must agree: {found}"
                          " (set model.hidden_dim and interpolate ${model.hidden_dim} in the components)")
    position_module = POSITION_ENCODINGS.build(position_encoding or {"type": "sine"}, num_pos_feats=d_model // 2)
    head_module = HEADS.build(head or {"type": "detr_head"}, hidden_dim=d_model, num_classes=num_classes)
    matcher_module = MATCHERS.build(matcher or {"type": "hungarian"})
    criterion = LOSSES.build(loss or {"type": "set_criterion"}, num_classes=num_classes, matcher=matcher_module)
    postprocessor_module = POSTPROCESSORS.build(postprocessor or {"type": "softmax"})
    return DETR(backbone_module, position_module, neck_module, transformer_module, head_module, criterion,
                postprocessor_module, num_queries=num_queries, num_classes=num_classes, aux_loss=aux_loss)
