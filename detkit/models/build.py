"""``build_model``: a ``model:`` config section -> a detector ``nn.Module``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn as nn
from omegaconf import OmegaConf

from detkit.errors import ConfigError, RegistryError
from detkit.registry import BACKBONES, DETECTORS

#: keys of the ``model:`` section that name weights (read by :mod:`detkit.weights.keys`), never given to the recipe
LOADER_KEYS = ("init_from", "init_from_ema", "class_map")
#: keys of the ``model.backbone:`` node that name weights
BACKBONE_LOADER_KEYS = ("weights",)


def recipe_node(node: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model:`` section without its loader keys: ``LOADER_KEYS``, ``backbone.weights`` and the backbone's own
    ``weights_arguments`` (class attribute: constructor arguments naming a weights file, such as the timm plugin's
    ``checkpoint_path``) when set, so that building never reads a file."""
    node = {k: v for k, v in node.items() if k not in LOADER_KEYS}
    backbone = node.get("backbone")
    if isinstance(backbone, Mapping):
        try:
            factory = BACKBONES.get(backbone["type"]) if isinstance(backbone.get("type"), str) else None
        except RegistryError:
            factory = None  # the build names the unknown type
        file_arguments = tuple(getattr(factory, "weights_arguments", ()) or ())
        node["backbone"] = {k: v for k, v in backbone.items()
                            if k not in BACKBONE_LOADER_KEYS and not (k in file_arguments and v)}
    return node


def build_model(model_cfg: Mapping[str, Any]) -> nn.Module:
    """Build the detector described by a ``model:`` section (a DictConfig or plain mapping).

    ``model_cfg["type"]`` names a DETECTORS recipe whose signature is the schema of the section. No weights are
    loaded here; use :func:`detkit.load_checkpoint` afterwards. Wrap the call in ``with torch.device("meta"):`` to
    build without allocating memory.

    The loader keys (``init_from``, ``init_from_ema``, ``class_map`` and ``backbone.weights``) are left out of what
    the recipe receives; :func:`detkit.weights.apply.apply_pretrained` checks them and applies them to the built
    model (the trainer does so at train time).
    """
    node = OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else model_cfg
    if not isinstance(node, Mapping) or not node:
        raise ConfigError("the config has no 'model' section (it needs at least 'type', e.g. 'type: lwdetr')")
    return DETECTORS.build(recipe_node(node))
