"""``build_model``: a ``model:`` config section -> a detector ``nn.Module``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from detkit.config import to_container
from detkit.errors import ConfigError
from detkit.registry import DETECTORS


def build_model(model_cfg: Mapping[str, Any]) -> nn.Module:
    """Build the detector described by a ``model:`` section (a DictConfig or plain mapping).

    ``model_cfg["type"]`` names a DETECTORS recipe whose signature is the schema of the section. No weights are
    loaded here; use :func:`detkit.load_checkpoint` afterwards. Wrap the call in ``with torch.device("meta"):`` to
    build without allocating memory.

    The loader keys (``init_from``, ``init_from_ema``, ``class_map`` and ``backbone.weights``) are checked and left
    out of what the recipe receives; :func:`detkit.models.pretrained.apply_pretrained` applies them to the built
    model (the trainer does so at train time).
    """
    from detkit.models.pretrained import split_loader_keys

    node = to_container(model_cfg)
    if not isinstance(node, Mapping) or not node:
        raise ConfigError("the config has no 'model' section (it needs at least 'type', e.g. 'type: lwdetr')")
    node, _ = split_loader_keys(node)
    return DETECTORS.build(node)
