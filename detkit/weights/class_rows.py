"""Class-head rows: which row of a checkpoint's class head each class of the data set takes.

Row ``i`` of a class head (class ``classes[i]``) takes the checkpoint row of the class with the same name, or of the
class (or row index) ``model.class_map`` names for it; other rows keep the architecture's initialisation.
Placeholder names (unused COCO ids) are never matched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from detkit.data.classes import CLASS_MAPS
from detkit.errors import ConfigError
from detkit.registry import did_you_mean
from detkit.weights.report import WeightsReport

__all__ = ["PLACEHOLDER_CLASSES", "is_class_head_key", "load_class_map", "row_pairs", "fit_names"]

#: class names that are placeholders (unused COCO ids) and never matched between checkpoints
PLACEHOLDER_CLASSES = frozenset({"N/A", "n/a", ""})


def is_class_head_key(key: str, shape: tuple[int, ...], num_classes: int) -> bool:
    """A class-head entry: its name contains ``class_embed`` and its first dimension is ``num_classes`` or
    ``num_classes + 1`` (DETR's no-object row)."""
    return "class_embed" in key and len(shape) >= 1 and shape[0] in (num_classes, num_classes + 1)


def load_class_map(class_map: Mapping[str, Any] | str | None) -> dict[str, str | int]:
    """``model.class_map`` as ``{data set class: checkpoint class or row}``: a mapping, a YAML/JSON file of one, or
    the name of a built-in map (:data:`detkit.data.classes.CLASS_MAPS`)."""
    if class_map is None:
        return {}
    if isinstance(class_map, str):
        if class_map in CLASS_MAPS:
            return dict(CLASS_MAPS[class_map]())
        path = Path(os.path.expanduser(class_map))
        if not path.is_file():
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


def row_pairs(new_classes: Sequence[str] | None, old_classes: Sequence[str] | None, n_new: int, n_old: int,
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


def fit_names(names: Sequence[str] | None, rows: int) -> list[str] | None:
    """Class names for ``rows`` rows: padded with placeholders; ``None`` when there are more names than rows."""
    if names is None:
        return None
    names = [str(n) for n in names]
    if len(names) > rows:
        return None
    return names + [""] * (rows - len(names))
