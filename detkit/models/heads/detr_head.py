"""DETR prediction heads: a class linear layer and a 3-layer box MLP, shared by every decoder layer."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from detkit.models.layers import MLP
from detkit.ops.precision import at_least_float32
from detkit.registry import HEADS

__all__ = ["DETRHead"]


@HEADS.register("detr_head")
class DETRHead(nn.Module):
    """``class_embed = Linear(d, num_classes + 1)`` (last logit = no-object) and ``bbox_embed = MLP(d, d, 4, 3)``
    followed by a sigmoid (normalised cxcywh). Keys equal the official ``class_embed.*`` / ``bbox_embed.*``.

    :param hidden_dim: decoder width (injected by the recipe).
    :param num_classes: number of object classes, without no-object (injected by the recipe).
    :param num_box_layers: depth of the box MLP.
    """

    def __init__(self, hidden_dim: int, num_classes: int, num_box_layers: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, num_box_layers)

    def forward(self, hs: Tensor) -> tuple[Tensor, Tensor]:
        """``hs (..., Q, d)`` -> ``logits (..., Q, num_classes + 1)``, ``boxes (..., Q, 4)`` in [0, 1].

        The boxes are float32 (or wider) under autocast too: the sigmoid runs on the box MLP's output cast up.
        """
        return self.class_embed(hs), at_least_float32(self.bbox_embed(hs)).sigmoid()
