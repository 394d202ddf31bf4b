"""detkit plugin: the ``timm`` backbone (any timm model with ``features_only=True``).

Importing this module registers the backbone; detkit imports it through the ``detkit.plugins`` entry point.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
import torch.nn as nn
from timm.models import group_parameters
from torch import Tensor

from detkit.errors import CheckpointError, ConfigError
from detkit.registry import BACKBONES, did_you_mean

__version__ = "0.1.0"


@BACKBONES.register("timm")
class TimmBackbone(nn.Module):
    """Any timm model as a multi-level backbone.

    :param name: a timm model name (``timm.list_models()``), e.g. ``convnext_tiny``, ``resnet50d``.
    :param out_indices: feature levels to return (timm's ``feature_info`` indices; negative counts from the end).
    :param pretrained: load timm's pretrained weights (needs network access to the hub; off by default).
    :param checkpoint_path: a local timm weight file to load instead (no network). Like ``model.backbone.weights``
        it is applied by detkit's weight loader after the build (see :attr:`weights_arguments`), so building never
        reads the file.
    :param drop_path_rate: stochastic depth rate passed to timm, where the model supports it.
    :param frozen: freeze every parameter (e.g. for linear probing).

    ``forward(images (B, 3, H, W)) -> [(B, out_channels[i], H / strides[i], W / strides[i]) for each level]``.

    For layer-wise lr decay (:func:`detkit.engine.optim.layer_decay_groups`) it declares ``num_layers``,
    ``layer_id(name)`` and ``no_weight_decay()`` from timm's own ``group_matcher`` / ``no_weight_decay`` where timm
    keeps the model whole under ``features_only`` (ViT-like models); other models (``FeatureListNet``: ResNet,
    ConvNeXt, ...) have ``num_layers = None``, and the policy then trains the backbone without layer-wise decay.
    """

    #: constructor arguments naming a weights file: detkit's loader takes them out and applies them as ``weights``
    weights_arguments = ("checkpoint_path",)

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
        self._layer_ids = self._timm_layer_ids()
        #: blocks counted by layer-wise lr decay (``None``: timm declares no layer grouping for this model)
        self.num_layers: int | None = max(self._layer_ids.values()) if self._layer_ids else None

    def _timm_layer_ids(self) -> dict[str, int]:
        """Layer id of every parameter (names relative to this module) from timm's ``group_matcher``: 0 for the stem,
        ``i + 1`` for block ``i`` (timm's ``param_groups_layer_decay`` grouping); empty without a matcher."""
        inner = getattr(self.model, "model", None)  # FeatureGetterNet keeps the timm model whole
        matcher = getattr(inner, "group_matcher", None)
        if not callable(matcher):
            return {}
        ids = group_parameters(inner, matcher(coarse=False), reverse=True)
        return {f"model.model.{name}": layer for name, layer in ids.items()}

    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay depth of parameter ``name`` (relative to this module); ``num_layers + 1`` for a name
        timm groups with no block (as the built-in ViT does)."""
        if self.num_layers is None:
            raise ValueError(f"timm model {self.name!r} declares no layer grouping (group_matcher)")
        return self._layer_ids.get(name, self.num_layers + 1)

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) trained without weight decay, by timm's rule: 1-d tensors, biases and the
        model's own ``no_weight_decay()`` names."""
        declared = getattr(getattr(self.model, "model", None), "no_weight_decay", None)
        own = {f"model.model.{name}" for name in declared()} if callable(declared) else set()
        return {name for name, param in self.named_parameters()
                if param.ndim <= 1 or name.endswith(".bias") or name in own}

    def forward(self, images: Tensor) -> list[Tensor]:
        return list(self.model(images))

    def pretrained_source(self, weights: str, file: str | None) -> dict[str, Any]:
        """The weights ``model.backbone.weights`` names, loaded by timm itself (detkit's backbone weights
        protocol, see :mod:`detkit.weights.apply`): a pretrained tag of this model (``a1_in1k``, through timm's hub
        download and cache) or a local timm file (``file``), as ``{"state_dict", "format"}`` of a timm feature model
        like ``self.model``."""
        out_indices = tuple(getattr(self.model.feature_info, "out_indices", ()) or ())
        kwargs: dict[str, Any] = {"features_only": True, "pretrained": True}
        if out_indices:
            kwargs["out_indices"] = out_indices
        if file is not None:
            kwargs["pretrained_cfg_overlay"] = {"file": str(file)}
            full = self.name
        else:
            full = weights if weights.startswith(self.name + ".") else f"{self.name}.{weights}"
            tags = timm.list_pretrained(f"{self.name}.*")
            if full not in tags:
                shown = ", ".join(t.split(".", 1)[1] for t in tags[:8])
                raise ConfigError(f"model.backbone.weights={weights!r}: timm has no pretrained tag {full!r}"
                                  f"{did_you_mean(full, tags)} (tags: {shown})")
        try:
            reference = timm.create_model(full, **kwargs)
        except Exception as e:  # timm raises many kinds (network, hub, key mismatch): all mean "these weights failed"
            raise CheckpointError(f"cannot load timm weights {weights!r} for {self.name!r}: {e}") from e
        described = " file" if file is not None else f" tag {weights}"
        return {"state_dict": reference.state_dict(), "format": "timm" + described}
