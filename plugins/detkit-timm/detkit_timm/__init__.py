"""detkit plugin: the ``timm`` backbone (any timm model with ``features_only=True``).

Importing this module registers the backbone; detkit imports it through the ``detkit.plugins`` entry point.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch.nn as nn
from torch import Tensor

from detkit.registry import BACKBONES

__version__ = "0.1.0"


@BACKBONES.register("timm")
class TimmBackbone(nn.Module):
    """Any timm model as a multi-level backbone.

    :param name: a timm model name (``timm.list_models()``), e.g. ``convnext_tiny``, ``resnet50d``.
    :param out_indices: feature levels to return (timm's ``feature_info`` indices; negative counts from the end).
    :param pretrained: load timm's pretrained weights (needs network access to the hub; off by default).
    :param checkpoint_path: a local timm weight file to load instead (no network).
    :param drop_path_rate: stochastic depth rate passed to timm, where the model supports it.
    :param frozen: freeze every parameter (e.g. for linear probing).

    ``forward(images (B, 3, H, W)) -> [(B, out_channels[i], H / strides[i], W / strides[i]) for each level]``.
    """

    def __init__(
        self,
        name: str,
        out_indices: Sequence[int] = (-1,),
        pretrained: bool = False,
        checkpoint_path: str = "",
        drop_path_rate: float = 0.0,
        frozen: bool = False,
    ) -> None:
        super().__init__()
        if not timm.is_model(name):
            import difflib

            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            raise ValueError(f"timm has no model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
        kwargs = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        self.model = timm.create_model(
            name,
            features_only=True,
            pretrained=pretrained,
            checkpoint_path=checkpoint_path,
            out_indices=tuple(out_indices),
            **kwargs,
        )
        self.name = name
        self.out_channels: list[int] = list(self.model.feature_info.channels())
        self.strides: list[int] = list(self.model.feature_info.reduction())
        if frozen:
            self.model.requires_grad_(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        return list(self.model(images))
