"""Starting from pretrained weights: ``model.init_from``, ``model.backbone.weights``, class-name remapping.

Modules never load weights while they are built (every model builds on the ``meta`` device); this module applies
weights to a model that :func:`detkit.models.build.build_model` has built. The keys it reads from the ``model:``
section are *loader keys* (:mod:`detkit.weights.keys`): ``build_model`` removes them before the recipe sees the
section.

``model.init_from: PATH_OR_URL``
    A whole detector: a detkit checkpoint (its EMA weights when it has them), or an official checkpoint of a
    registered format (:data:`~detkit.registry.CHECKPOINT_FORMATS`: official DETR; official LW-DETR
    ``checkpoint.pth`` or ``checkpoint_best_ema.pth``; the format is detected and the keys converted on the fly). A
    URL is downloaded once into ``torch.hub.get_dir()/checkpoints`` (see :func:`detkit.weights.io.resolve_source`).
``model.init_from_ema: null | true | false``
    Which weights of the file: null picks the EMA weights of a detkit checkpoint and ``model`` of an official one
    (what the official code loads); true takes ``ema`` / ``ema_model``, false ``model``.
``model.class_map: {new_name: old_name_or_row} | FILE | o365_to_coco``
    Class-head rows follow the data set's class names: row ``i`` (class ``classes[i]``) takes the checkpoint row of
    the class with the same name, or of the class (or row index) ``class_map`` names for it; other rows keep the
    architecture's initialisation (DETR: default ``Linear`` init; LW-DETR: prior bias ``-log((1-0.01)/0.01)``);
    DETR's no-object row is kept. ``o365_to_coco`` is the official LW-DETR Objects365 -> COCO map (the COCO recipes
    use it; on a data set with only some of the COCO classes, its entries for the others are skipped, while a map
    you write must name classes of the data set).
``model.backbone.weights: NAME | PATH | URL``
    Backbone only: a name the backbone owns (``resnet``: a torchvision weights name, ``IMAGENET1K_V1``, ``DEFAULT``,
    ``ResNet50_Weights.IMAGENET1K_V2``, through the torch hub cache; the timm plugin: a timm pretrained tag such as
    ``a1_in1k``, with timm's own download and cache, its ``checkpoint_path`` read as ``weights``), or a file in any
    common layout (torchvision / timm state dicts, detkit or official detector checkpoints, the MIM-pretrained ViT
    checkpoints LW-DETR starts from, with ``encoder.`` keys: the prefixes are found by matching names and shapes).
    Position embeddings of another grid are resized (bicubic); keys the backbone does not use are reported.

**The backbone weights protocol.** A backbone class may define (models never import this package; they return data)::

    def pretrained_source(self, weights: str, file: str | None) -> dict | None

``weights`` is what the config says; ``file`` the local file it names (a path, or a URL's cached copy), ``None`` for
a name. It returns ``None`` (a file goes to the generic loader below; a name is an error: "has no named weights"),
``{"url": URL, "format": TEXT}`` (named weights downloaded through the cache, then read as a file), or
``{"state_dict": {key: tensor}, "format": TEXT}`` (the weights themselves, for a library that loads its own, like
timm). A class attribute ``weights_arguments = ("checkpoint_path",)`` names constructor arguments that are weights
files, taken out of the build and applied here as ``weights``.

Each load returns a :class:`~detkit.weights.report.WeightsReport` (and logs its table): loaded / converted (renamed)
/ resized / class rows / re-initialised / unexpected keys, plus where the weights came from (path or URL, file,
SHA-256, format).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn
from torch import Tensor

from detkit.errors import CheckpointError, ConfigError
from detkit.registry import CHECKPOINT_FORMATS
from detkit.weights.formats import find_detkit, find_official
from detkit.weights.io import is_url, looks_like_path, read_checkpoint, resolve_source, sha256_of
from detkit.weights.keys import LoaderSpec, has_pretrained, plain, split_loader_keys
from detkit.weights.report import WeightsReport
from detkit.weights.state import load_detector_state, pick_state, place

__all__ = [
    "LoaderSpec",
    "WeightsReport",
    "split_loader_keys",
    "has_pretrained",
    "apply_pretrained",
    "init_from",
    "load_backbone_weights",
    "load_detector_state",
    "resolve_source",
    "read_checkpoint",
]

log = logging.getLogger("detkit.pretrained")

_NO_EMA = "(no 'ema' or 'ema_model' entry); set model.init_from_ema=false or null to use 'model'"


# ---------------------------------------------------------------------------------------------------------------------
# Whole-model load
# ---------------------------------------------------------------------------------------------------------------------


def init_from(model: nn.Module, source: str, classes: Sequence[str] | None = None,
              class_map: Mapping[str, Any] | str | None = None, use_ema: bool | None = None,
              model_type: str | None = None, progress: bool = True) -> WeightsReport:
    """Load a whole detector from ``source`` (path or URL; a detkit checkpoint or an official one of a registered
    format).

    :param classes: the data set's class names (row ``i`` of the class heads is ``classes[i]``).
    :param class_map: ``{class: checkpoint class or row}``, a YAML/JSON file of it, or a built-in map name.
    :param use_ema: ``None``: a detkit checkpoint's EMA weights when present, an official checkpoint's ``model``.
    :param model_type: the ``model.type`` being built; a checkpoint of another type is refused.
    :raises CheckpointError: unreadable file, another architecture, or no key fits the model.
    """
    path = resolve_source(source, progress=progress)
    ckpt = read_checkpoint(path)
    report = WeightsReport(target="model", source=str(source), file=str(path), sha256=sha256_of(path))
    old_type, old_classes = None, None
    if "detkit_version" in ckpt or ("config" in ckpt and "classes" in ckpt):
        state, report.entry = pick_state(ckpt, use_ema, path, no_ema=_NO_EMA)
        cfg = ckpt.get("config") if isinstance(ckpt.get("config"), Mapping) else {}
        old_type = (cfg.get("model") or {}).get("type") if isinstance(cfg.get("model"), Mapping) else None
        old_classes = list(ckpt["classes"]) if ckpt.get("classes") is not None else None
        report.format = "detkit"
        original = set(state)
    else:
        state, report.entry = pick_state(ckpt, False if use_ema is None else use_ema, path, no_ema=_NO_EMA)
        original = set(state)
        report.format = "state dict"
        official = find_official(state)
        if official is not None:
            old_type, fmt = official
            report.format = fmt.label
            state = fmt.to_detkit(state, inference_only=False)
            report.renamed = f"official -> detkit names ({type(fmt).__module__})"
            old_classes = fmt.official_classes(state)
        else:
            old_type = (find_detkit(state) or (None, None))[0]
        if report.entry == "ema_model":
            report.format += " (EMA)"
    if old_type and model_type and old_type != model_type and model_type in CHECKPOINT_FORMATS:
        raise CheckpointError(f"model.init_from: {source} holds a {old_type!r} model, but this config builds "
                              f"{model_type!r}")
    load_detector_state(model, state, report, new_classes=classes, old_classes=old_classes, class_map=class_map,
                        original_keys=original)
    if not report.used:
        raise CheckpointError(f"model.init_from: no key of {source} fits this model (another architecture?)\n"
                              f"{report.table()}")
    return report


# ---------------------------------------------------------------------------------------------------------------------
# Backbone-only load
# ---------------------------------------------------------------------------------------------------------------------


def _best_prefixes(state: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> tuple[str, str]:
    """``(file prefix, model prefix)`` that maps the most file keys onto model keys of the same shape
    (e.g. ``("", "body.")`` for a torchvision ResNet, ``("encoder.", "")`` for a MIM ViT checkpoint)."""
    suffixes: dict[str, list[str]] = {}
    for key in own:
        parts = key.split(".")
        for i in range(min(3, len(parts))):
            suffixes.setdefault(".".join(parts[i:]), []).append(".".join(parts[:i]) + ("." if i else ""))
    counts: dict[tuple[str, str], int] = {}
    for key, value in state.items():
        parts = key.split(".")
        for i in range(min(5, len(parts))):
            rest = ".".join(parts[i:])
            for op in suffixes.get(rest, ()):
                fp = ".".join(parts[:i]) + ("." if i else "")
                target = own[op + rest]
                ok = tuple(target.shape) == tuple(value.shape) or key.endswith("pos_embed")
                if ok:
                    counts[(fp, op)] = counts.get((fp, op), 0) + 1
    if not counts:
        return "", ""
    best = max(counts.values())
    return next(pair for pair, n in counts.items() if n == best)  # first in file order among equals


def _load_module_state(module: nn.Module, state: Mapping[str, Tensor], report: WeightsReport,
                       prefix: str = "backbone.") -> WeightsReport:
    """Copy ``state`` (any prefix layout) into ``module``; report keys with the model-level ``prefix``."""
    own = module.state_dict()
    fp, op = _best_prefixes(state, own)
    if fp != op:
        report.renamed = f"{fp}* -> {prefix}{op}*"
    usable: dict[str, Tensor] = {}
    for key, value in state.items():
        if not key.startswith(fp) or (op + key[len(fp):]) not in own:
            if not key.endswith("num_batches_tracked"):  # a BN counter, not a weight (frozen BN has none)
                report.unexpected.append(key)
            continue
        name = op + key[len(fp):]
        target = own[name]
        full = prefix + name
        place(usable, name, full, value, target, report, report.converted if name != key else report.loaded)
    report.reinitialised.extend(prefix + k for k in own if k not in usable and prefix + k not in report.reinitialised)
    module.load_state_dict(usable, strict=False)
    return report


def load_backbone_weights(model: nn.Module, weights: str, backbone_node: Mapping[str, Any] | None = None,
                          progress: bool = True) -> WeightsReport:
    """Load ``weights`` (a name the backbone owns, a path or a URL) into ``model.backbone``; see the module doc."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ConfigError("model.backbone.weights: this model has no 'backbone' module")
    btype = str((backbone_node or {}).get("type", "")) or type(backbone).__name__.lower()
    report = WeightsReport(target="backbone", source=str(weights))
    path: Path | None = None
    if is_url(weights) or looks_like_path(weights):
        path = resolve_source(weights, progress=progress)
    hook = getattr(backbone, "pretrained_source", None)
    source = hook(weights, None if path is None else str(path)) if callable(hook) else None
    if source is not None and "state_dict" in source:  # the backbone's library loaded the weights itself
        report.format = str(source.get("format", ""))
        if path is not None:
            report.file, report.sha256 = str(path), sha256_of(path)
        return _load_module_state(backbone, source["state_dict"], report)
    if path is None:
        if source is None or "url" not in source:
            raise ConfigError(f"model.backbone.weights={weights!r}: no such file, and the {btype!r} backbone has no "
                              "named weights; give a local file or a URL")
        url = str(source["url"])
        path, report.format = resolve_source(url, progress=progress), str(source.get("format", ""))
        report.source = f"{weights} ({url})"
    report.file, report.sha256 = str(path), sha256_of(path)
    ckpt = read_checkpoint(path)
    state, report.entry = pick_state(ckpt, False, path)
    if not report.format:
        report.format = "file"
    _load_module_state(backbone, state, report)
    if not report.used:
        raise CheckpointError(f"model.backbone.weights: no key of {weights} fits the {btype!r} backbone\n"
                              f"{report.table()}")
    return report


# ---------------------------------------------------------------------------------------------------------------------
# Everything a model section asks for
# ---------------------------------------------------------------------------------------------------------------------


def apply_pretrained(model: nn.Module, model_cfg: Mapping[str, Any], classes: Sequence[str] | None = None,
                     init_from_override: str | None = None, progress: bool = True,
                     quiet: bool = False) -> list[WeightsReport]:
    """Apply the loader keys of ``model_cfg`` to the built ``model``: backbone weights first, then ``init_from``
    (which, covering the backbone too, wins where both load). Each load logs its table unless ``quiet``.

    :param classes: the data set's class names, for the class-head rows.
    :param init_from_override: a whole-model source given elsewhere (``train.finetune_from``).
    """
    node, spec = split_loader_keys(plain(model_cfg) or {})
    if init_from_override:
        if spec.init_from and spec.init_from != init_from_override:
            raise ConfigError(f"model.init_from={spec.init_from!r} and train.finetune_from={init_from_override!r} "
                              "disagree; set one")
        spec.init_from = init_from_override
    reports = []
    if spec.backbone_weights:
        reports.append(load_backbone_weights(model, spec.backbone_weights, spec.backbone, progress=progress))
    if spec.init_from:
        reports.append(init_from(model, spec.init_from, classes=classes, class_map=spec.class_map,
                                 use_ema=spec.init_from_ema, model_type=node.get("type"), progress=progress))
    elif spec.class_map:
        log.warning("model.class_map is set but model.init_from is not: the map is unused")
    for report in reports:
        if not quiet:
            log.info("%s", report.table())
        misfit = [k for k in report.reinitialised if "class_embed" not in k]
        if report.target == "model" and misfit:
            log.warning("%d key(s) of the model were not in %s or had another shape and keep their initial values "
                        "(%s%s): is it the same model variant?", len(misfit), report.source, ", ".join(misfit[:4]),
                        ", ..." if len(misfit) > 4 else "")
    return reports
