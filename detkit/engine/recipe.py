"""The recipe follows the data: values a config leaves ``null`` are derived from the training split.

:func:`derive_recipe` is the one documented rule book, used by the trainer (before the first step; each value is
logged once with its reason and written to the run's resolved ``config.yaml``) and by ``detkit data check`` (which
prints what it would choose). An explicit value always wins; only these keys are derived when ``null``:

``model.num_queries``
    From the largest number of objects in one training image, with slack: the smallest of
    :data:`QUERY_LADDER` that is at least :data:`QUERY_SLACK` times it (30 at least). LW-DETR's two-stage
    proposals come from the stride-16 map, so the input must hold that many positions: ``(S / 16)^2 >= queries``;
    a fixed input that holds fewer caps the queries (with a warning).
``model.postprocessor.num_select``
    The number of queries (one detection per query and class pair kept per query, on average).
``data.val_transforms.size`` (the input size ``S``; ``lwdetr_val``) and the ``null`` sizes of ``lwdetr_train``
    From the object sizes: ``S`` is the smallest multiple of 64 at which the smallest tenth of the objects spans
    :data:`TARGET_OBJECT_PX` input pixels, never more than the images' own size (median ``sqrt(w * h)``, so small
    objects keep every pixel they have, and large images of large objects are shrunk) and within
    ``[MIN_INPUT, MAX_INPUT]``. Training sizes are the multiples of 64 within 0.75-1.25 ``S``, the crop branch
    resizes to 0.625, 0.78 and 0.94 ``S`` and crops 0.6-0.94 ``S`` (the official 640 px recipe's ratios).
``train.epochs``
    From the number of images: about :data:`IMAGE_PRESENTATIONS` images seen in all (tens of images get hundreds of
    epochs, large sets the 12-epoch "1x" schedule), within ``[MIN_EPOCHS, MAX_EPOCHS]``.
``train.warmup_iters``
    3% of the optimizer steps (10 to 1000).
``train.eval_interval``
    About :data:`EVALUATIONS` evaluations over the run.

``train.max_minutes`` (not derived) then ends training after that much training time, with the schedule fitted to
it by the trainer (:func:`fit_to_time`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

QUERY_LADDER = (30, 60, 100, 150, 200, 300, 500, 900)
QUERY_SLACK = 2.0
TARGET_OBJECT_PX = 16.0  # one stride-16 cell of LW-DETR's feature map
SMALL_QUANTILE = 0.1
MIN_INPUT, MAX_INPUT, INPUT_MULTIPLE = 128, 1024, 64
IMAGE_PRESENTATIONS = 12_000
MIN_EPOCHS, MAX_EPOCHS = 12, 300
WARMUP_FRACTION, MIN_WARMUP, MAX_WARMUP = 0.03, 10, 1000
EVALUATIONS = 8
#: below these, training from scratch is unlikely to reach a useful model: fine-tune instead
FEW_IMAGES, FEW_OBJECTS = 200, 2000
FINETUNE_CONFIG = "configs/lwdetr_tiny_finetune.yaml"

#: every key :func:`derive_recipe` may fill (dotted), for tools that read a config the trainer resolved
DERIVED_KEYS = ("model.num_queries", "model.postprocessor.num_select", "data.val_transforms.size",
                "data.train_transforms.sizes", "data.train_transforms.crop_resize_sizes",
                "data.train_transforms.crop_min_size", "data.train_transforms.crop_max_size", "train.epochs",
                "train.warmup_iters", "train.eval_interval")


#: what ``configs/lwdetr_own_data.yaml`` leaves to derive (for ``detkit data check``, which has no config)
OWN_DATA_TREE: dict[str, Any] = {
    "model": {"type": "lwdetr", "num_queries": None, "postprocessor": {"num_select": None}},
    "data": {"train_transforms": {"type": "lwdetr_train", "sizes": None, "crop_resize_sizes": None,
                                  "crop_min_size": None, "crop_max_size": None},
             "val_transforms": {"type": "lwdetr_val", "size": None}},
    "train": {"epochs": None, "warmup_iters": None, "eval_interval": None, "batch_size": 8},
}


@dataclass
class DataStats:
    """What the rules look at, read from annotations only (no image is decoded).

    ``objects_per_image (N,)``, ``object_sides (M,)`` (``sqrt(w * h)`` in pixels of their image),
    ``relative_sides (M,)`` (the same over ``sqrt`` of the image's area), ``image_sides (N,)`` (``sqrt(w * h)``)."""

    num_images: int
    objects_per_image: np.ndarray
    object_sides: np.ndarray
    relative_sides: np.ndarray
    image_sides: np.ndarray

    @property
    def num_objects(self) -> int:
        return int(self.objects_per_image.sum())

    @property
    def max_objects(self) -> int:
        return int(self.objects_per_image.max()) if self.num_images else 0


def data_stats(dataset: Any) -> DataStats | None:
    """:class:`DataStats` of a detkit data set (``annotations(i)`` and ``image_info(i)`` of every image), or None
    for a data set without them (one a test or notebook made)."""
    if not (callable(getattr(dataset, "annotations", None)) and callable(getattr(dataset, "image_info", None))):
        return None
    counts, sides, relative, image_sides = [], [], [], []
    for index in range(len(dataset)):
        info = dataset.image_info(index)
        boxes = np.asarray(dataset.annotations(index)[0], np.float64).reshape(-1, 4)
        area = max(float(info["width"]) * float(info["height"]), 1.0)
        side = np.sqrt(np.clip((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 0, None))
        counts.append(len(boxes))
        sides.append(side)
        relative.append(side / math.sqrt(area))
        image_sides.append(math.sqrt(area))
    cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0))  # noqa: E731
    return DataStats(len(counts), np.asarray(counts, np.int64), cat(sides), cat(relative),
                     np.asarray(image_sides, np.float64))


@dataclass
class Choice:
    """One derived value: ``key`` (dotted), ``value`` and the ``reason`` printed with it."""

    key: str
    value: Any
    reason: str

    @property
    def name(self) -> str:
        """Short name: ``num_queries``, ``input size``, ``train crop_min_size``, ``epochs``, ..."""
        if self.key == "data.val_transforms.size":
            return "input size"
        if self.key.startswith("data.train_transforms."):
            return "train " + self.key.rsplit(".", 1)[-1]
        return self.key.rsplit(".", 1)[-1]

    def __str__(self) -> str:
        return f"{self.name} {self.value}: {self.reason}"


@dataclass
class Recipe:
    """What :func:`derive_recipe` chose, and warnings about the data (too few images, objects too small...)."""

    choices: list[Choice] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def value(self, key: str) -> Any:
        return next((c.value for c in self.choices if c.key == key), None)


def _get(tree: Mapping[str, Any], key: str, default: Any = "absent") -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def pending_keys(tree: Mapping[str, Any]) -> list[str]:
    """The :data:`DERIVED_KEYS` that ``tree`` (a config as plain containers) leaves ``null``."""
    return [k for k in DERIVED_KEYS if _get(tree, k) is None]


def round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple - 1e-9) * multiple)


def queries_for(max_objects: int) -> int:
    """The smallest of :data:`QUERY_LADDER` >= ``QUERY_SLACK * max_objects`` (the largest one past it)."""
    need = QUERY_SLACK * max_objects
    return next((q for q in QUERY_LADDER if q >= need), QUERY_LADDER[-1])


def input_size_for(stats: DataStats) -> tuple[int, str]:
    """The square input side for ``stats`` (see the module docstring) and the reason."""
    if stats.num_objects == 0:
        native = float(np.median(stats.image_sides)) if stats.num_images else 640.0
        size = min(max(round_up(native, INPUT_MULTIPLE), MIN_INPUT), MAX_INPUT)
        return size, "no objects to size it by: the images' own size"
    small_rel = float(np.quantile(stats.relative_sides, SMALL_QUANTILE))
    small_px = float(np.quantile(stats.object_sides, SMALL_QUANTILE))
    native = float(np.median(stats.image_sides))
    want = TARGET_OBJECT_PX / max(small_rel, 1e-6)
    cap = round_up(native, INPUT_MULTIPLE)
    size = round_up(min(want, cap), INPUT_MULTIPLE)
    size = min(max(size, MIN_INPUT), MAX_INPUT)
    tenth = f"a tenth of the objects are under {small_px:.0f} px in images of {native:.0f} px"
    if want >= cap:
        why = f"{tenth}: kept at the images' own size so they keep every pixel ({small_rel * size:.0f} px here)"
    else:
        why = f"{tenth}: they still span {small_rel * size:.0f} px at this size"
    return size, why


def lwdetr_train_sizes(size: int) -> dict[str, Any]:
    """``lwdetr_train`` sizes for input side ``size``: the official 640 px recipe's ratios, multiples of 64 (sizes)
    and 8 (crop branch)."""
    sizes = [s for s in range(INPUT_MULTIPLE, 4 * size, INPUT_MULTIPLE) if 0.75 * size <= s <= 1.25 * size] or [size]
    crop_resize = sorted({max(8, round_up(size * r, 8)) for r in (0.625, 0.78, 0.94)})
    return {"sizes": sizes, "crop_resize_sizes": crop_resize, "crop_min_size": max(8, round_up(0.6 * size, 8)),
            "crop_max_size": max(8, round_up(0.94 * size, 8))}


def epochs_for(num_images: int) -> int:
    return int(min(max(math.ceil(IMAGE_PRESENTATIONS / max(num_images, 1)), MIN_EPOCHS), MAX_EPOCHS))


def warmup_for(total_steps: int) -> int:
    warm = min(max(round(WARMUP_FRACTION * total_steps), MIN_WARMUP), MAX_WARMUP)
    return int(max(1, min(warm, total_steps // 2)))


def eval_interval_for(epochs: int) -> int:
    return int(max(1, math.ceil(epochs / EVALUATIONS)))


def derive_recipe(tree: Mapping[str, Any], stats: DataStats, world_size: int = 1) -> Recipe:
    """The values to fill in the config ``tree`` (plain containers) for data with ``stats``; keys the config sets
    are left alone (an explicit value always wins), but are checked against the data (warnings).

    Rules: see the module docstring. ``world_size`` processes share each epoch (steps per epoch)."""
    recipe = Recipe()
    choose = recipe.choices.append
    warn = recipe.warnings.append
    if stats.num_images == 0:
        warn("the training split is empty: the values below are placeholders")
    model_type = _get(tree, "model.type", None)
    two_stage = model_type == "lwdetr"
    if stats.num_images and stats.num_objects == 0:
        warn("the training split has images but no objects: the model can only learn 'nothing here'")
    if stats.num_images < FEW_IMAGES or stats.num_objects < FEW_OBJECTS:
        warn(f"{stats.num_images} training images with {stats.num_objects} objects are few to train a detector "
             f"from scratch: fine-tune from COCO weights instead ({FINETUNE_CONFIG}), or expect a long training")
    # queries
    queries = _get(tree, "model.num_queries", None)
    need = queries_for(stats.max_objects)
    if queries is None:
        queries = need
        rounding = f"at least {QUERY_LADDER[0]}" if queries == QUERY_LADDER[0] else f"rounded up to {queries}"
        choose(Choice("model.num_queries", queries, f"up to {stats.max_objects} objects in one image"
                      f" (x{QUERY_SLACK:g} slack, {rounding})"))
    elif isinstance(queries, int) and queries < stats.max_objects:
        warn(f"model.num_queries={queries} is below the {stats.max_objects} objects of the fullest training image: "
             "recall is capped; leave it null to derive it from the data")
    # input size
    val = _get(tree, "data.val_transforms", None)
    size = val.get("size", "absent") if isinstance(val, Mapping) and val.get("type") == "lwdetr_val" else "absent"
    min_side = round_up(16 * math.sqrt(queries), INPUT_MULTIPLE) if two_stage and isinstance(queries, int) else 0
    if size is None:
        size, why = input_size_for(stats)
        if min_side > size:
            size, why = min_side, why + f"; raised to {min_side} so the stride-16 map holds {queries} proposals"
        choose(Choice("data.val_transforms.size", size, why))
    if isinstance(size, int) and stats.num_objects:
        small = float(np.quantile(stats.relative_sides, SMALL_QUANTILE)) * size
        if small < 8:
            warn(f"a tenth of the objects are under {small:.0f} px at input size {size}: predict in tiles "
                 "(--tile) and train on crops of the images, or raise the input size")
        if two_stage and isinstance(queries, int) and (size // 16) ** 2 < queries:
            warn(f"input size {size} gives {(size // 16) ** 2} stride-16 positions, fewer than "
                 f"{queries} queries; raise the input size or lower model.num_queries")
    train_node = _get(tree, "data.train_transforms", None)
    if isinstance(train_node, Mapping) and train_node.get("type") == "lwdetr_train" and isinstance(size, int):
        defaults = lwdetr_train_sizes(size)
        filled = [k for k in defaults if k in train_node and train_node[k] is None]
        for key in filled:
            choose(Choice(f"data.train_transforms.{key}", defaults[key], f"scaled to the input size {size}"))
    # num_select
    if _get(tree, "model.postprocessor.num_select") is None and isinstance(queries, int):
        choose(Choice("model.postprocessor.num_select", queries, "one per query"))
    # schedule
    batch = int(_get(tree, "train.batch_size", 4) or 4) * max(int(_get(tree, "train.accumulate", 1) or 1), 1)
    steps_per_epoch = max(1, stats.num_images // max(batch * world_size, 1))
    epochs = _get(tree, "train.epochs", None)
    if epochs is None:
        epochs = epochs_for(stats.num_images)
        choose(Choice("train.epochs", epochs, f"{stats.num_images} training images: about "
                      f"{IMAGE_PRESENTATIONS} images seen in all, within {MIN_EPOCHS}-{MAX_EPOCHS} epochs"))
    total = steps_per_epoch * int(epochs)
    if _get(tree, "train.warmup_iters") is None:
        warm = warmup_for(total)
        choose(Choice("train.warmup_iters", warm, f"{WARMUP_FRACTION:.0%} of {total} optimizer steps"))
    if _get(tree, "train.eval_interval") is None:
        interval = eval_interval_for(int(epochs))
        choose(Choice("train.eval_interval", interval, f"about {EVALUATIONS} evaluations in {epochs} epochs"))
    return recipe


def apply_recipe(tree: Mapping[str, Any], recipe: Recipe) -> dict[str, Any]:
    """A copy of ``tree`` with the choices filled in."""
    import copy

    out = copy.deepcopy(dict(tree))
    for choice in recipe.choices:
        _set(out, choice.key, choice.value)
    return out


def without_pending_transforms(data_tree: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` section with transform nodes that still have ``null`` sizes replaced by None (normalisation only), so
    the data sets can be built to derive the sizes from; the trainer then sets the derived transforms."""
    out = dict(data_tree)
    for key in ("train_transforms", "val_transforms"):
        node = out.get(key)
        if isinstance(node, Mapping) and any(v is None for v in node.values()):
            out[key] = None
    return out


def resolved_overrides(tree: Mapping[str, Any], saved: Mapping[str, Any] | None) -> list[str]:
    """``key=value`` overrides that fill the ``null`` derived keys of ``tree`` with the values a run resolved
    (``saved``: a checkpoint's config), so a config that derives them can be used to evaluate that run."""
    import json

    if not isinstance(saved, Mapping):
        return []
    return [f"{key}={json.dumps(_get(saved, key))}" for key in pending_keys(tree)
            if _get(saved, key, None) is not None]


def placeholders(tree: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``tree`` with stand-ins for the derived model keys (to build the model before there is data,
    ``detkit check``) and a note per stand-in."""
    out = apply_recipe(tree, Recipe([Choice(k, v, "") for k, v in (("model.num_queries", 100),
                                                                    ("model.postprocessor.num_select", 100))
                                     if _get(tree, k) is None]))
    notes = [f"note: {k} is null (derived from the data set at train time); checked with 100"
             for k in ("model.num_queries", "model.postprocessor.num_select") if _get(tree, k) is None]
    return out, notes


def histogram(counts: Sequence[int] | np.ndarray) -> list[tuple[str, int]]:
    """Objects-per-image bins ``(label, images)``: 0, 1, 2-3, 4-7, ... (powers of two)."""
    counts = np.asarray(counts, np.int64)
    if counts.size == 0:
        return []
    edges = [0, 1, 2]
    while edges[-1] <= counts.max():
        edges.append(edges[-1] * 2)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        label = str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}"
        rows.append((label, int(((counts >= lo) & (counts < hi)).sum())))
    return rows
