"""The loader keys of a ``model:`` section: what weights it asks for, parsed and type-checked.

``model.init_from``, ``model.init_from_ema``, ``model.class_map`` and ``model.backbone.weights`` are read by the
weight loader, never by a recipe; :func:`detkit.models.build.build_model` leaves them out of what the recipe gets
(and so do a backbone's ``weights_arguments``, e.g. the timm plugin's ``checkpoint_path``, read here as ``weights``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from detkit.data.classes import CLASS_MAPS
from detkit.errors import ConfigError, RegistryError
from detkit.registry import BACKBONES

__all__ = ["MODEL_LOADER_KEYS", "BACKBONE_LOADER_KEYS", "LoaderSpec", "split_loader_keys", "has_pretrained",
           "weights_arguments"]

#: keys of the ``model:`` section that the loader reads (never passed to the recipe)
MODEL_LOADER_KEYS = ("init_from", "init_from_ema", "class_map")
#: keys of the ``model.backbone:`` node that the loader reads
BACKBONE_LOADER_KEYS = ("weights",)


@dataclass
class LoaderSpec:
    """What the loader keys of a ``model:`` section ask for (all optional)."""

    init_from: str | None = None
    init_from_ema: bool | None = None
    class_map: Mapping[str, Any] | str | None = None
    backbone_weights: str | None = None
    backbone: dict[str, Any] = field(default_factory=dict)  # the backbone node (type, name, ...) without loader keys

    @property
    def empty(self) -> bool:
        return not (self.init_from or self.backbone_weights)


def weights_arguments(backbone_type: Any) -> tuple[str, ...]:
    """The constructor arguments of backbone ``backbone_type`` that name a weights file (its class attribute
    ``weights_arguments``); the loader applies them after the build, as ``weights``. Unknown types have none (the
    build reports them)."""
    if not isinstance(backbone_type, str) or not backbone_type:
        return ()
    try:
        factory = BACKBONES.get(backbone_type)
    except RegistryError:
        return ()
    return tuple(getattr(factory, "weights_arguments", ()) or ())


def split_loader_keys(node: Mapping[str, Any]) -> tuple[dict[str, Any], LoaderSpec]:
    """``(recipe node, spec)``: the ``model:`` section without the loader keys, and what they say.

    Types are checked here (a :class:`ConfigError` naming the key), files are not: ``detkit check`` passes without
    the weight files, which are only read at train time.
    """
    node = dict(node)
    spec = LoaderSpec()
    init = node.pop("init_from", None)
    if init is not None and not isinstance(init, (str, os.PathLike)):
        raise ConfigError(f"model.init_from must be a path or URL, got {init!r}")
    spec.init_from = os.fspath(init) if init not in (None, "") else None
    ema = node.pop("init_from_ema", None)
    if ema is not None and not isinstance(ema, bool):
        raise ConfigError(f"model.init_from_ema must be true, false or null, got {ema!r}")
    spec.init_from_ema = ema
    cmap = node.pop("class_map", None)
    if cmap is not None and not isinstance(cmap, (str, Mapping)):
        raise ConfigError("model.class_map must be a mapping {new_class: checkpoint_class_or_row}, a file or one of "
                          f"{', '.join(CLASS_MAPS)}; got {cmap!r}")
    spec.class_map = cmap or None
    backbone = node.get("backbone")
    if isinstance(backbone, Mapping):
        for argument in weights_arguments(backbone.get("type")):
            if backbone.get(argument):
                # a backbone argument naming a weights file is applied by this loader after the build, like ``weights``
                backbone = dict(backbone)
                if backbone.get("weights"):
                    raise ConfigError(f"set model.backbone.weights or model.backbone.{argument}, not both")
                backbone["weights"] = backbone.pop(argument)
    if isinstance(backbone, Mapping) and "weights" in backbone:
        backbone = dict(backbone)
        weights = backbone.pop("weights")
        if weights is not None and not isinstance(weights, (str, os.PathLike)):
            raise ConfigError(f"model.backbone.weights must be a weights name, a path or a URL, got {weights!r}")
        spec.backbone_weights = os.fspath(weights) if weights not in (None, "") else None
        node["backbone"] = backbone
    if isinstance(backbone, Mapping):
        spec.backbone = dict(backbone)
    return node, spec


def plain(node: Any) -> Any:
    """A config node (OmegaConf or plain) as plain, resolved dicts and lists."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def has_pretrained(model_cfg: Mapping[str, Any]) -> bool:
    """True when the ``model:`` section asks for any weights (``init_from`` or ``backbone.weights``)."""
    return not split_loader_keys(plain(model_cfg) or {})[1].empty
