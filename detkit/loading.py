"""Loading a checkpoint for inference, shared by the eval, predict, export and bench tools.

It sits above models and weights (it composes configs and builds models, so it cannot live in
:mod:`detkit.weights`) and beside :mod:`detkit.predict`. A checkpoint written by the trainer holds everything
needed: ``config`` (the model is rebuilt from ``config["model"]``, images are prepared with
``config["data"]["val_transforms"]``), ``classes`` and the weights (``ema`` when present, else ``model``). An
official checkpoint of a registered format (:data:`~detkit.registry.CHECKPOINT_FORMATS`) loads with the detkit
config of the same variant; it is converted on the fly.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from detkit.errors import CheckpointError, ConfigError

__all__ = ["WEIGHTS_CHOICES", "LoadedModel", "load_for_inference", "default_cat_ids"]

WEIGHTS_CHOICES = ("auto", "ema", "model")


@dataclass
class LoadedModel:
    """A detector rebuilt from a checkpoint, in eval mode, with what is needed to feed it."""

    model: nn.Module
    config: dict[str, Any]  # resolved config as plain containers (the checkpoint's, or the one given)
    classes: list[str]
    weights: str  # "ema" or "model": which entry of the checkpoint was loaded
    path: Path
    checkpoint: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def val_transforms(self) -> Mapping[str, Any] | None:
        return (self.config.get("data") or {}).get("val_transforms", _default_val_transforms())


def _default_val_transforms() -> Any:
    from detkit.config import DataConfig

    return DataConfig().val_transforms


def _model_type(cfg: Mapping[str, Any] | None) -> str | None:
    model = (cfg or {}).get("model") if isinstance(cfg, Mapping) else None
    return model.get("type") if isinstance(model, Mapping) else None


def load_for_inference(checkpoint: str | os.PathLike[str], config: str | os.PathLike[str] | None = None,
                       overrides: Sequence[str] = (), device: str | torch.device = "auto",
                       weights: str = "auto", plugin_imports: Sequence[str] = (), optimize: bool = True
                       ) -> LoadedModel:
    """Rebuild the detector of ``checkpoint`` and load its weights (eval mode, on ``device``).

    :param device: ``auto`` (a GPU when one is usable, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or a
        ``torch.device``; resolved by :func:`detkit.engine.device.resolve_device`, as in training.

    :param config: a config file to build the model from instead of the checkpoint's own config (``detkit eval``);
        it must describe the same architecture: another model type, or weights that do not fit, raise a
        :class:`~detkit.errors.CheckpointError` that says so.
    :param overrides: dotted overrides applied to ``config`` (only with ``config``).
    :param weights: ``auto`` (EMA weights when the checkpoint has them, else the raw model), ``ema`` or ``model``.
    :param plugin_imports: local plugin modules you trust to import. A checkpoint is untrusted input, so the
        ``plugins.imports`` recorded in its own config are never imported unless named here (or already imported).
    :param optimize: apply :func:`detkit.models.fuse.optimize_for_inference` (batch norms folded into their
        convolutions, channels-last weights): same outputs up to float rounding, faster; the model's state dict then
        no longer has the training layout, so pass ``False`` to get a model to fine-tune or save.
    """
    from detkit import plugins
    from detkit.config import compose, to_container
    from detkit.engine.device import resolve_device
    from detkit.models.build import build_model
    from detkit.weights.formats import find_official
    from detkit.weights.io import load_checkpoint_file
    from detkit.weights.state import load_state_dict, pick_state

    target = resolve_device(device)  # a bad device fails before the checkpoint is read
    path = Path(os.path.expanduser(str(checkpoint)))
    ckpt = load_checkpoint_file(path)
    saved_cfg = ckpt.get("config")
    classes = [str(c) for c in ckpt.get("classes") or []]
    if config is not None:
        cfg = to_container(compose(config, list(overrides)))
        saved_type, new_type = _model_type(saved_cfg), _model_type(cfg)
        if saved_type and new_type and saved_type != new_type:
            raise CheckpointError(f"wrong config for the checkpoint: {path} holds a {saved_type!r} model but "
                                  f"{config} builds {new_type!r}")
    else:
        if overrides:
            raise ConfigError("overrides need a config file")
        saved_state = ckpt.get("model")
        official = find_official(saved_state) if not isinstance(saved_cfg, Mapping) and isinstance(
            saved_state, Mapping) else None
        if official is not None:
            raise CheckpointError(f"{path} is an {official[1].label} checkpoint, which records no config: pass the "
                                  "detkit config of the same variant (detkit eval --config, config=...), or convert "
                                  "it once with `detkit convert`")
        if not isinstance(saved_cfg, Mapping) or not isinstance(saved_cfg.get("model"), Mapping):
            raise CheckpointError(f"{path} has no saved config to rebuild the model from (entries: "
                                  f"{', '.join(map(str, ckpt))}); pass the config file it was trained with")
        cfg = json.loads(json.dumps(saved_cfg))  # a private plain copy
    model_cfg = dict(cfg.get("model") or {})
    if model_cfg.get("num_classes", "absent") is None:
        saved_n = ((saved_cfg or {}).get("model") or {}).get("num_classes") if isinstance(saved_cfg, Mapping) else None
        if saved_n is None and not classes:
            raise CheckpointError(f"model.num_classes is null and {path} records no classes; set model.num_classes")
        model_cfg["num_classes"] = int(saved_n if saved_n is not None else len(classes))
        cfg["model"] = model_cfg
    plugin_cfg = cfg.get("plugins") or {}
    imports = list(plugin_cfg.get("imports") or [])
    if config is None:  # the config came from the checkpoint: it may not make detkit import code
        untrusted = [m for m in imports if m not in plugin_imports and m not in sys.modules]
        if untrusted:
            raise CheckpointError(
                f"{path} was trained with local plugin modules {untrusted} (plugins.imports in its saved config); "
                "detkit never imports code named inside a checkpoint. If you trust them, pass "
                + " ".join(f"--plugin-import {m}" for m in untrusted)
                + " (Python: plugin_imports=[...]), or pass the config file you trained with")
    plugins.configure(plugin_cfg.get("disable") or [], [*imports, *plugin_imports])
    if weights not in WEIGHTS_CHOICES:
        raise ConfigError(f"weights must be one of {', '.join(WEIGHTS_CHOICES)}, got {weights!r}")
    state, key = pick_state(ckpt, {"auto": None, "ema": True, "model": False}[weights], path,
                            no_ema="(it was trained with train.ema=false); use --weights model",
                            model_entries=("model",), bare=False,
                            no_model="; is it a detkit checkpoint? Official checkpoints need `detkit convert` first")
    official = find_official(state) if config is not None else None
    if official is not None:  # an official checkpoint with a detkit config: converted (and checked) on the fly
        name, fmt = official
        if model_cfg.get("type") != name:
            raise CheckpointError(f"wrong config for the checkpoint: {path} is an {fmt.label} checkpoint but "
                                  f"{config} builds {model_cfg.get('type')!r}")
        state = fmt.to_detkit(state, model_cfg=model_cfg)
        classes = classes or fmt.official_classes(state) or []
    model = build_model(model_cfg)
    try:
        load_state_dict(model, state, strict=True, source=f"{path} ({key})")
    except CheckpointError as e:
        if config is not None:
            e.add_note(f"wrong config for the checkpoint? {config} builds a model whose parameters differ from "
                       f"{path}'s (e.g. another size preset, hidden_dim or num_classes)")
        raise
    if not classes:
        n = int(getattr(model, "num_classes", 0))
        classes = [f"class_{i}" for i in range(n)]
    model.eval().to(target)
    if optimize:
        from detkit.models.fuse import optimize_for_inference

        optimize_for_inference(model)
    return LoadedModel(model=model, config=cfg, classes=classes, weights=key, path=path, checkpoint=ckpt)


def default_cat_ids(loaded: LoadedModel) -> list[int]:
    """Category ids for COCO results: the checkpoint's ``cat_ids`` when recorded, label = id for the
    ``coco_official`` label map, else ``label + 1`` (COCO ids start at 1)."""
    saved = loaded.checkpoint.get("cat_ids")
    if isinstance(saved, (list, tuple)) and len(saved) == len(loaded.classes):
        return [int(c) for c in saved]
    if (loaded.config.get("data") or {}).get("label_map") == "coco_official":
        return list(range(len(loaded.classes)))
    return [i + 1 for i in range(len(loaded.classes))]
