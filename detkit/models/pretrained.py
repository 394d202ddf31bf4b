"""Starting from pretrained weights: ``model.init_from``, ``model.backbone.weights``, class-name remapping.

Modules never load weights while they are built (every model builds on the ``meta`` device); this module applies
weights to a model that :func:`detkit.models.build.build_model` has built. The keys it reads from the ``model:``
section are *loader keys*: ``build_model`` removes them before the recipe sees the section.

``model.init_from: PATH_OR_URL``
    A whole detector: a detkit checkpoint (its EMA weights when it has them), an official DETR checkpoint, or an
    official LW-DETR checkpoint (``checkpoint.pth`` or ``checkpoint_best_ema.pth``; the format is detected and the
    keys converted on the fly). A URL is downloaded once into ``torch.hub.get_dir()/checkpoints`` (with a progress
    bar; a ``-<hex>.`` part of the file name is checked against the file's SHA-256, as ``torch.hub`` does).
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
    Backbone only: a torchvision weights name for ``resnet`` (``IMAGENET1K_V1``, ``DEFAULT``,
    ``ResNet50_Weights.IMAGENET1K_V2``; the file comes from torchvision's URL through the torch hub cache), a timm
    pretrained tag for ``timm`` backbones (``a1_in1k``; timm's own download and cache; the plugin's
    ``checkpoint_path`` is read as ``weights``), or a file in any common
    layout (torchvision / timm state dicts, detkit or official detector checkpoints, the MIM-pretrained ViT
    checkpoints LW-DETR starts from, with ``encoder.`` keys). Position embeddings of another grid are resized
    (bicubic); keys the backbone does not use are reported.

Each load returns a :class:`WeightsReport` (and logs its table): loaded / converted (renamed) / resized / class
rows / re-initialised / unexpected keys, plus where the weights came from (path or URL, file, SHA-256, format).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import re
import urllib.error
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from detkit.engine.checkpoint import PLACEHOLDER_CLASSES, is_class_head_key
from detkit.errors import CheckpointError, ConfigError

__all__ = [
    "MODEL_LOADER_KEYS",
    "BACKBONE_LOADER_KEYS",
    "CLASS_MAPS",
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
    "resize_pos_embed",
]

log = logging.getLogger("detkit.pretrained")

#: keys of the ``model:`` section that the loader reads (never passed to the recipe)
MODEL_LOADER_KEYS = ("init_from", "init_from_ema", "class_map")
#: keys of the ``model.backbone:`` node that the loader reads
BACKBONE_LOADER_KEYS = ("weights",)

# The official LW-DETR Objects365 -> COCO head remap (util/obj365_to_coco_model.py): COCO category id ``c`` takes
# Objects365 row ``o + 1`` for the pairs below.
# fmt: off
_COCO_IDS = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34, 35,
    36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64,
    65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
]
_O365_IDS = [
    0, 46, 5, 58, 114, 55, 116, 65, 21, 40, 176, 127, 249, 24, 56, 139, 92, 78, 99, 96, 144, 295, 178, 180, 38, 39, 13,
    43, 120, 219, 148, 173, 165, 154, 137, 113, 145, 146, 204, 8, 35, 10, 88, 84, 93, 26, 112, 82, 265, 104, 141, 152,
    234, 143, 150, 97, 2, 50, 25, 75, 98, 153, 37, 73, 115, 132, 106, 61, 163, 134, 277, 81, 133, 18, 94, 30, 169, 70,
    328, 226,
]
# fmt: on


def _o365_to_coco() -> dict[str, int]:
    from detkit.convert.cli import COCO_OFFICIAL_CLASSES

    return {COCO_OFFICIAL_CLASSES[c]: o + 1 for c, o in zip(_COCO_IDS, _O365_IDS, strict=True)}


#: built-in class maps usable as ``model.class_map: NAME`` (COCO class name -> checkpoint row)
CLASS_MAPS = {"o365_to_coco": _o365_to_coco}

_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".pkl", ".tar")


# ---------------------------------------------------------------------------------------------------------------------
# The loader keys of a model section
# ---------------------------------------------------------------------------------------------------------------------


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
    if isinstance(backbone, Mapping) and backbone.get("type") == "timm" and backbone.get("checkpoint_path"):
        # the timm plugin's file argument is applied by this loader after the build, like ``weights``
        backbone = dict(backbone)
        if backbone.get("weights"):
            raise ConfigError("set model.backbone.weights or model.backbone.checkpoint_path, not both")
        backbone["weights"] = backbone.pop("checkpoint_path")
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


def has_pretrained(model_cfg: Mapping[str, Any]) -> bool:
    """True when the ``model:`` section asks for any weights (``init_from`` or ``backbone.weights``)."""
    from detkit.config import to_container

    return not split_loader_keys(to_container(model_cfg) or {})[1].empty


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class WeightsReport:
    """What one load did to each key (model-level key names). The first five lists partition the model's keys."""

    target: str = "model"  # "model" or "backbone"
    source: str = ""  # what the config said: a path, a URL or a weights name
    file: str = ""  # the local file read
    sha256: str = ""
    format: str = ""  # detkit | official DETR | official LW-DETR | torchvision | timm | state dict
    entry: str = ""  # the checkpoint entry the weights came from (model, ema, ema_model, ...)
    renamed: str = ""  # how file keys were renamed, e.g. "encoder.* -> backbone.*"
    loaded: list[str] = field(default_factory=list)  # copied unchanged under the same name
    converted: list[str] = field(default_factory=list)  # copied from a key of another name (official layout, prefix)
    resized: list[str] = field(default_factory=list)  # copied after a shape change (pos-embed grid, query groups)
    class_rows: list[str] = field(default_factory=list)  # class heads whose rows were matched by class name
    reinitialised: list[str] = field(default_factory=list)  # left as the architecture initialises them
    unexpected: list[str] = field(default_factory=list)  # keys of the file the model has no use for
    matched_classes: list[str] = field(default_factory=list)  # "name" or "name <- checkpoint class"
    new_classes: list[str] = field(default_factory=list)  # classes whose rows were initialised
    notes: dict[str, str] = field(default_factory=dict)  # key -> what happened (shapes, resize)

    @property
    def used(self) -> int:
        return len(self.loaded) + len(self.converted) + len(self.resized) + len(self.class_rows)

    def table(self) -> str:
        def show(keys: list[str], n: int = 6) -> str:
            keys = [f"{k} {self.notes[k]}" if k in self.notes else k for k in keys]
            return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")

        what = f"{self.format}" + (f", entry '{self.entry}'" if self.entry else "")
        lines = [f"{self.target} weights from {self.source} ({what})"]
        if self.file and self.file != self.source:
            lines.append(f"  file            {self.file}")
        if self.sha256:
            lines.append(f"  sha256          {self.sha256[:16]}")
        if self.renamed:
            lines.append(f"  keys            {self.renamed}")
        rows = [("loaded", self.loaded, False), ("converted", self.converted, True), ("resized", self.resized, True),
                ("class rows", self.class_rows, True), ("re-initialised", self.reinitialised, True),
                ("unexpected", self.unexpected, True)]
        for name, keys, detail in rows:
            lines.append(f"  {name:<15} {len(keys):>6}  {show(keys) if detail else ''}".rstrip())
        if self.class_rows or self.new_classes:
            lines.append(f"    classes kept  {len(self.matched_classes):>6}  {show(self.matched_classes, 8)}".rstrip())
            lines.append(f"    classes new   {len(self.new_classes):>6}  {show(self.new_classes, 8)}".rstrip())
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """Provenance and outcome, JSON-serialisable (stored in the run directory and the checkpoint)."""
        return {"target": self.target, "source": self.source, "file": self.file, "sha256": self.sha256,
                "format": self.format, "entry": self.entry, "renamed": self.renamed, "loaded": len(self.loaded),
                "converted": len(self.converted), "resized": self.resized, "class_rows": self.class_rows,
                "matched_classes": self.matched_classes, "new_classes": self.new_classes,
                "reinitialised": self.reinitialised, "unexpected": self.unexpected}


# ---------------------------------------------------------------------------------------------------------------------
# Files: URLs into the torch hub cache, safe reading
# ---------------------------------------------------------------------------------------------------------------------


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https", "ftp", "file")


def _looks_like_path(source: str) -> bool:
    return (os.sep in source or "/" in source or source.startswith(("~", "."))
            or source.lower().endswith(_WEIGHT_SUFFIXES) or Path(source).exists())


def resolve_source(source: str, progress: bool = True) -> Path:
    """A local file for ``source``: the path itself, or a URL's copy in ``torch.hub.get_dir()/checkpoints``.

    A URL is downloaded once (atomically, with a progress bar); when its file name carries a hash (``name-<hex>.ext``)
    the download must match it, as ``torch.hub`` checks. Failures are a :class:`CheckpointError` that says where to
    put the file by hand.
    """
    if not _is_url(source):
        path = Path(os.path.expanduser(source))
        if not path.is_file():
            raise CheckpointError(f"weights file not found: {path}")
        return path
    name = os.path.basename(urllib.parse.urlparse(source).path)
    if not name:
        raise ConfigError(f"{source}: the URL names no file")
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    dst = cache / name
    if dst.is_file():
        return dst
    match = torch.hub.HASH_REGEX.search(name)
    hash_prefix = match.group(1) if match and match.group(1) else None
    log.info("downloading %s to %s", source, dst)
    import socket

    old_timeout = socket.getdefaulttimeout()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        socket.setdefaulttimeout(old_timeout or 60.0)  # never hang forever on an unreachable host
        torch.hub.download_url_to_file(source, str(dst), hash_prefix=hash_prefix, progress=progress)
    except RuntimeError as e:
        if "hash" not in str(e):
            raise
        raise CheckpointError(f"{source}: the downloaded file's SHA-256 does not start with {hash_prefix!r}, the hash "
                              "in its file name; the download is corrupt or the file changed, so nothing was cached "
                              f"({e})") from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise CheckpointError(f"cannot download {source}: {reason}. Without network access, fetch the file elsewhere "
                              f"and put it at {dst} (or give its local path instead of the URL)") from e
    finally:
        socket.setdefaulttimeout(old_timeout)
    return dst


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` that also accepts the ``argparse.Namespace`` official checkpoints store
    under ``args`` (plain attributes, no code runs); anything else that needs unpickling is refused."""
    from detkit.engine.checkpoint import load_checkpoint_file

    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_checkpoint_file(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensors(state: Any, where: str) -> dict[str, Tensor]:
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{where}: no state dict")
    bad = [str(k) for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{where}: not a state dict (entries that are not tensors: {', '.join(bad[:5])})")
    return dict(state)


def _state_entry(ckpt: Mapping[str, Any], path: Path, use_ema: bool | None) -> tuple[dict[str, Tensor], str]:
    """The weights of a checkpoint dict: ``model`` / ``ema`` / ``ema_model`` / ``state_dict`` / the dict itself."""
    if use_ema:
        for key in ("ema", "ema_model"):
            value = ckpt.get(key)
            if isinstance(value, Mapping) and value:
                inner = value.get("module", value)
                return _tensors(inner, f"{path} '{key}'"), key
        raise CheckpointError(f"{path} has no EMA weights (no 'ema' or 'ema_model' entry); set "
                              "model.init_from_ema=false or null to use 'model'")
    for key in ("model", "state_dict", "module"):
        value = ckpt.get(key)
        if isinstance(value, Mapping) and value and all(isinstance(v, Tensor) for v in value.values()):
            return dict(value), key
    return _tensors(ckpt, str(path)), ""


# ---------------------------------------------------------------------------------------------------------------------
# Shape adaptation helpers
# ---------------------------------------------------------------------------------------------------------------------


def _grid(n: int) -> tuple[int, int] | None:
    """``(class slots, side)`` for a position table of ``n`` tokens: ``side^2`` or ``side^2 + 1``."""
    for extra in (1, 0):
        side = math.isqrt(n - extra) if n - extra > 0 else 0
        if side and side * side == n - extra:
            return extra, side
    return None


def resize_pos_embed(pos: Tensor, shape: Sequence[int]) -> Tensor:
    """A ViT position table ``(1, [1 +] g^2, D)`` resized to ``shape = (1, [1 +] G^2, D)``: the grid part
    bicubic-interpolated (``align_corners=False``) from ``g x g`` to ``G x G``, the class slot kept (or zero)."""
    src, dst = _grid(pos.shape[1]), _grid(int(shape[1]))
    if pos.dim() != 3 or len(shape) != 3 or src is None or dst is None or pos.shape[2] != shape[2]:
        raise ValueError(f"cannot resize a position embedding {tuple(pos.shape)} to {tuple(shape)}")
    (extra_s, g), (extra_d, gd) = src, dst
    d = pos.shape[2]
    grid = pos[:, extra_s:].reshape(1, g, g, d).permute(0, 3, 1, 2).float()
    if g != gd:
        grid = F.interpolate(grid, size=(gd, gd), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, gd * gd, d).to(pos.dtype)
    if not extra_d:
        return grid
    cls = pos[:, :1] if extra_s else torch.zeros(1, 1, d, dtype=pos.dtype)
    return torch.cat([cls, grid], dim=1)


def _adapt_groups(model: nn.Module, state: dict[str, Tensor], report: WeightsReport) -> dict[str, Tensor]:
    """LW-DETR: fit the file's Group-DETR groups to the model's (drop extra groups; repeat group 0..G-1 when the
    model trains with more groups than an inference-only file has)."""
    groups = getattr(model, "group_detr", None)
    queries = getattr(model, "num_queries", None)
    if not groups or not queries or "refpoint_embed.weight" not in state:
        return state
    from detkit.convert import lwdetr as conv

    try:
        have = conv.num_groups(state)
    except CheckpointError:
        return state
    rows = state["refpoint_embed.weight"].shape[0]
    if have == groups or rows != have * queries or state.get("query_feat.weight", state["refpoint_embed.weight"]
                                                             ).shape[0] != rows:
        return state  # same groups, or other queries: the generic path reports it
    out = dict(state)
    for key in ("refpoint_embed.weight", "query_feat.weight"):
        value = state[key]
        if groups < have:
            out[key] = value[: groups * queries].clone()
        else:
            out[key] = torch.cat([value[(g % have) * queries:(g % have + 1) * queries] for g in range(groups)])
        report.notes[key] = f"{have}->{groups} groups"
    pattern = re.compile(r"^(transformer\.(?:enc_output|enc_output_norm|enc_out_bbox_embed|enc_out_class_embed))"
                         r"\.(\d+)\.(.+)$")
    for key in list(state):
        m = pattern.match(key)
        if m and groups > have and int(m.group(2)) < have:
            for g in range(have, groups):
                if g % have == int(m.group(2)):
                    new = f"{m.group(1)}.{g}.{m.group(3)}"
                    out[new] = state[key]
                    report.notes[new] = f"copy of group {g % have}"
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Class heads
# ---------------------------------------------------------------------------------------------------------------------


def _load_class_map(class_map: Mapping[str, Any] | str | None) -> dict[str, str | int]:
    if class_map is None:
        return {}
    if isinstance(class_map, str):
        if class_map in CLASS_MAPS:
            return dict(CLASS_MAPS[class_map]())
        path = Path(os.path.expanduser(class_map))
        if not path.is_file():
            from detkit.registry import did_you_mean

            raise ConfigError(f"model.class_map: {class_map!r} is neither a file nor a built-in map"
                              f"{did_you_mean(class_map, CLASS_MAPS)} (built-in: {', '.join(CLASS_MAPS)})")
        import yaml

        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"model.class_map: cannot read {path}: {e}") from e
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"model.class_map: {path} must hold a mapping new_class: checkpoint_class_or_row")
        class_map = loaded
    out: dict[str, str | int] = {}
    for k, v in class_map.items():
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ConfigError(f"model.class_map[{k!r}] must be a checkpoint class name or row index, got {v!r}")
        out[str(k)] = v
    return out


def _row_pairs(new_classes: Sequence[str] | None, old_classes: Sequence[str] | None, n_new: int, n_old: int,
               class_map: Mapping[str, str | int], report: WeightsReport) -> list[tuple[int, int]] | None:
    """``[(new row, old row)]`` for the class heads, or ``None`` when the rows correspond one to one."""
    if not class_map and (new_classes is None or old_classes is None):
        if n_new == n_old:
            return None
        report.new_classes.extend(n for n in (new_classes or [])[:n_new] if n not in PLACEHOLDER_CLASSES)
        return []
    if not class_map and list(new_classes or []) == list(old_classes or []) and n_new == n_old:
        return None
    if new_classes is None:
        raise ConfigError("model.class_map needs the data set's class names, and this data set has none")
    from detkit.registry import did_you_mean

    unknown = [k for k in class_map if k not in new_classes]
    if unknown:
        raise ConfigError(f"model.class_map names {unknown[0]!r}, which is not a class of the data set"
                          f"{did_you_mean(unknown[0], new_classes)}")
    old_index: dict[str, int] = {}
    for j, name in enumerate(old_classes or []):
        if name not in PLACEHOLDER_CLASSES and j < n_old:
            old_index.setdefault(name, j)
    pairs = []
    for i, name in enumerate(new_classes[:n_new]):
        if name in PLACEHOLDER_CLASSES:
            continue
        if name in class_map:
            want = class_map[name]
            if isinstance(want, int):
                if not 0 <= want < n_old:
                    raise ConfigError(f"model.class_map[{name!r}] = {want}: the checkpoint has rows 0..{n_old - 1}")
                j = want
            elif want in old_index:
                j = old_index[want]
            else:
                known = "the checkpoint has no class names" if not old_index else \
                    f"not a class of the checkpoint{did_you_mean(want, old_index)}"
                raise ConfigError(f"model.class_map[{name!r}] = {want!r}: {known}")
            pairs.append((i, j))
            report.matched_classes.append(f"{name} <- {want}" if want != name else name)
        elif name in old_index:
            pairs.append((i, old_index[name]))
            report.matched_classes.append(name)
        else:
            report.new_classes.append(name)
    return pairs


# ---------------------------------------------------------------------------------------------------------------------
# Whole-model load
# ---------------------------------------------------------------------------------------------------------------------


def load_detector_state(model: nn.Module, state: Mapping[str, Tensor], report: WeightsReport,
                        new_classes: Sequence[str] | None = None, old_classes: Sequence[str] | None = None,
                        class_map: Mapping[str, Any] | str | None = None,
                        original_keys: set[str] | None = None) -> WeightsReport:
    """Copy a detkit-layout ``state`` into ``model``, fitting what can be fitted, and fill ``report``.

    Same-shape keys are copied; class heads (``*class_embed*`` with ``num_classes`` or ``num_classes + 1`` rows)
    are matched row by row by class name / ``class_map`` when the class lists differ (extra rows, DETR's no-object,
    are kept); LW-DETR query groups and ViT position grids are resized; everything else that does not fit stays as
    initialised. Nothing raises except a ``class_map`` error: the report tells what happened.

    :param original_keys: the file's key names before conversion (a loaded key not among them was converted).
    """
    own = model.state_dict()
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None and new_classes is not None:
        num_classes = len(new_classes)
    cmap = _load_class_map(class_map)
    if isinstance(class_map, str) and class_map in CLASS_MAPS and new_classes is not None:
        # a built-in map covers a whole label set (COCO): a data set with a part of it uses that part
        cmap = {k: v for k, v in cmap.items() if k in set(new_classes)}
    state = _adapt_groups(model, dict(state), report)
    pairs_cache: dict[tuple[int, int], list[tuple[int, int]] | None] = {}
    usable: dict[str, Tensor] = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        target = own[key]
        renamed = original_keys is not None and key not in original_keys
        if num_classes is not None and is_class_head_key(key, tuple(target.shape), num_classes):
            extra = target.shape[0] - num_classes
            n_old = value.shape[0] - extra
            if n_old >= 1 and tuple(value.shape[1:]) == tuple(target.shape[1:]):
                if (n_old, num_classes) not in pairs_cache:
                    pairs_cache[(n_old, num_classes)] = _row_pairs(
                        _fit_names(new_classes, num_classes), _fit_names(old_classes, n_old), num_classes, n_old,
                        cmap, report)
                pairs = pairs_cache[(n_old, num_classes)]
                if pairs is None:  # the same classes in the same rows
                    usable[key] = value
                    (report.converted if renamed else report.loaded).append(key)
                    continue
                if pairs or extra:
                    merged = target.detach().to("cpu", copy=True)
                    if pairs:
                        rows_new, rows_old = zip(*pairs)
                        merged[list(rows_new)] = value[list(rows_old)].to(merged.dtype)
                    if extra:
                        merged[num_classes:] = value[n_old:].to(merged.dtype)
                    usable[key] = merged
                    report.class_rows.append(key)
                    report.notes[key] = f"{len(pairs)}/{num_classes} rows from {n_old}"
                    continue
            report.reinitialised.append(key)
            report.notes[key] = f"{tuple(value.shape)}->{tuple(target.shape)}"
            continue
        fitted = report.resized if key in report.notes else (report.converted if renamed else report.loaded)
        _place(usable, key, key, value, target, report, fitted)
    report.reinitialised.extend(k for k in own if k not in state)
    model.load_state_dict(usable, strict=False)
    return report


def _fit_names(names: Sequence[str] | None, rows: int) -> list[str] | None:
    """Class names for ``rows`` rows: padded with placeholders; ``None`` when there are more names than rows."""
    if names is None:
        return None
    names = [str(n) for n in names]
    if len(names) > rows:
        return None
    return names + [""] * (rows - len(names))


def _official_classes(state: Mapping[str, Tensor], extra: int) -> list[str] | None:
    """The COCO names of an official checkpoint whose class head has the 91 COCO slots (+ no-object)."""
    from detkit.convert.cli import COCO_OFFICIAL_CLASSES

    for key in ("class_embed.weight", "head.class_embed.weight"):
        if key in state and state[key].shape[0] - extra == len(COCO_OFFICIAL_CLASSES):
            return list(COCO_OFFICIAL_CLASSES)
    return None


def init_from(model: nn.Module, source: str, classes: Sequence[str] | None = None,
              class_map: Mapping[str, Any] | str | None = None, use_ema: bool | None = None,
              model_type: str | None = None, progress: bool = True) -> WeightsReport:
    """Load a whole detector from ``source`` (path or URL; detkit, official DETR or official LW-DETR checkpoint).

    :param classes: the data set's class names (row ``i`` of the class heads is ``classes[i]``).
    :param class_map: ``{class: checkpoint class or row}``, a YAML/JSON file of it, or a built-in map name.
    :param use_ema: ``None``: a detkit checkpoint's EMA weights when present, an official checkpoint's ``model``.
    :param model_type: the ``model.type`` being built; a detkit checkpoint of another type is refused.
    :raises CheckpointError: unreadable file, another architecture, or no key fits the model.
    """
    path = resolve_source(source, progress=progress)
    ckpt = read_checkpoint(path)
    report = WeightsReport(target="model", source=str(source), file=str(path), sha256=_sha256(path))
    is_detkit = "detkit_version" in ckpt or ("config" in ckpt and "classes" in ckpt)
    if is_detkit:
        state, report.entry = _state_entry(ckpt, path, True if (use_ema is None and ckpt.get("ema")) else use_ema)
        cfg = ckpt.get("config") if isinstance(ckpt.get("config"), Mapping) else {}
        old_type = (cfg.get("model") or {}).get("type") if isinstance(cfg.get("model"), Mapping) else None
        old_classes = list(ckpt["classes"]) if ckpt.get("classes") is not None else None
        report.format = "detkit"
        original = set(state)
    else:
        state, report.entry = _state_entry(ckpt, path, use_ema)
        original = set(state)
        from detkit.convert import detr as detr_conv
        from detkit.convert import lwdetr as lwdetr_conv

        old_type, old_classes = None, None
        if detr_conv.looks_official(state):
            old_type, report.format = "detr", "official DETR"
            state = detr_conv.official_to_detkit(state)
            report.renamed = "official -> detkit names (detkit.convert.detr)"
            old_classes = _official_classes(state, extra=1)
        elif lwdetr_conv.looks_official(state):
            old_type, report.format = "lwdetr", "official LW-DETR"
            state = lwdetr_conv.official_to_detkit(state, inference_only=False)
            report.renamed = "official -> detkit names (detkit.convert.lwdetr)"
            old_classes = _official_classes(state, extra=0)
        elif detr_conv.looks_detkit(state):
            old_type, report.format = "detr", "state dict"
        elif lwdetr_conv.looks_detkit(state):
            old_type, report.format = "lwdetr", "state dict"
        else:
            report.format = "state dict"
        if report.entry == "ema_model":
            report.format += " (EMA)"
    if old_type and model_type and old_type != model_type and model_type in ("detr", "lwdetr"):
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


def _place(usable: dict[str, Tensor], name: str, full: str, value: Tensor, target: Tensor, report: WeightsReport,
           fitted: list[str]) -> None:
    """Put checkpoint tensor ``value`` at ``usable[name]`` when it fits ``target`` (then ``full`` joins ``fitted``);
    a position embedding of another grid is resized; anything else keeps its initialisation (reported)."""
    if tuple(value.shape) == tuple(target.shape):
        usable[name] = value
        fitted.append(full)
        return
    if name.endswith("pos_embed"):
        try:
            usable[name] = resize_pos_embed(value, target.shape)
        except ValueError:
            report.reinitialised.append(full)
        else:
            report.resized.append(full)
    else:
        report.reinitialised.append(full)
    report.notes[full] = f"{tuple(value.shape)}->{tuple(target.shape)}"


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
        _place(usable, name, full, value, target, report, report.converted if name != key else report.loaded)
    report.reinitialised.extend(prefix + k for k in own if k not in usable and prefix + k not in report.reinitialised)
    module.load_state_dict(usable, strict=False)
    return report


def _torchvision_file(depth: int, name: str, progress: bool) -> tuple[Path, str, str]:
    from torchvision.models import get_model_weights

    from detkit.registry import did_you_mean

    enum = get_model_weights(f"resnet{depth}")
    owner, _, member = name.rpartition(".")
    if owner and owner != enum.__name__:
        raise ConfigError(f"model.backbone.weights={name!r}: a depth-{depth} ResNet takes {enum.__name__}.* weights")
    if member not in enum.__members__:
        raise ConfigError(f"model.backbone.weights={name!r}: unknown torchvision weights for resnet{depth}"
                          f"{did_you_mean(member, enum.__members__)} (choices: {', '.join(enum.__members__)})")
    weights = enum[member]
    return resolve_source(weights.url, progress=progress), weights.url, f"torchvision {enum.__name__}.{weights.name}"


def _timm_reference(backbone: nn.Module, weights: str, path: Path | None) -> nn.Module:
    """A timm feature model like ``backbone.model``, built by timm with the pretrained weights loaded."""
    import timm

    from detkit.registry import did_you_mean

    name = str(getattr(backbone, "name", ""))
    features = getattr(backbone, "model", None)
    if not name or features is None:
        raise ConfigError("model.backbone.weights: the timm backbone has no 'name'/'model' to load into")
    out_indices = tuple(getattr(features.feature_info, "out_indices", ()) or ())
    kwargs: dict[str, Any] = {"features_only": True, "pretrained": True}
    if out_indices:
        kwargs["out_indices"] = out_indices
    if path is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        full = name
    else:
        full = weights if weights.startswith(name + ".") else f"{name}.{weights}"
        tags = timm.list_pretrained(f"{name}.*")
        if full not in tags:
            raise ConfigError(f"model.backbone.weights={weights!r}: timm has no pretrained tag {full!r}"
                              f"{did_you_mean(full, tags)} (tags: {', '.join(t.split('.', 1)[1] for t in tags[:8])})")
    try:
        return timm.create_model(full, **kwargs)
    except Exception as e:  # timm raises many kinds (network, hub, key mismatch): all mean "these weights failed"
        raise CheckpointError(f"cannot load timm weights {weights!r} for {name!r}: {e}") from e


def load_backbone_weights(model: nn.Module, weights: str, backbone_node: Mapping[str, Any] | None = None,
                          progress: bool = True) -> WeightsReport:
    """Load ``weights`` (a torchvision / timm name, a path or a URL) into ``model.backbone``; see the module doc."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ConfigError("model.backbone.weights: this model has no 'backbone' module")
    btype = str((backbone_node or {}).get("type", "")) or type(backbone).__name__.lower()
    report = WeightsReport(target="backbone", source=str(weights))
    path: Path | None = None
    if _is_url(weights) or _looks_like_path(weights):
        path = resolve_source(weights, progress=progress)
    if btype == "timm":
        ref = _timm_reference(backbone, weights, path)
        report.format = "timm" + (" file" if path else f" tag {weights}")
        if path is not None:
            report.file, report.sha256 = str(path), _sha256(path)
        return _load_module_state(backbone, ref.state_dict(), report)
    if path is None:
        if btype == "resnet" or hasattr(backbone, "depth") and hasattr(backbone, "body"):
            path, url, report.format = _torchvision_file(int(getattr(backbone, "depth", 50)), weights, progress)
            report.source = f"{weights} ({url})"
        else:
            raise ConfigError(f"model.backbone.weights={weights!r}: no such file, and the {btype!r} backbone has no "
                              "named weights; give a local file or a URL")
    report.file, report.sha256 = str(path), _sha256(path)
    ckpt = read_checkpoint(path)
    state, report.entry = _state_entry(ckpt, path, None)
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
    from detkit.config import to_container

    node, spec = split_loader_keys(to_container(model_cfg) or {})
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
