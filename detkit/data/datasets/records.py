"""Annotation checks shared by the file formats: label maps, box sanitising and :class:`Record` (one clean image).

A format module turns each raw annotation into a call of :meth:`RecordBuilder.add`, which checks the box against the
image (:func:`classify_box`), maps the category to a label (:class:`LabelMap`) and counts every problem in the
:class:`~detkit.data.report.DataReport`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detkit.data.report import DataReport
from detkit.errors import DataError

#: boxes narrower or lower than this (pixels) are degenerate; keeps every kept box valid after any resize
MIN_BOX_SIDE = 1e-2
LABEL_MAPS = ("contiguous", "coco_official")


# ---------------------------------------------------------------------------------------------------------------------
# Label maps
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelMap:
    """``classes[label]`` is a name, ``cat_ids[label]`` the original category id; ``to_label`` maps id -> label."""

    classes: list[str]
    cat_ids: list[int]
    to_label: dict[int, int]

    @classmethod
    def build(cls, categories: Iterable[tuple[int, str]], mode: str = "contiguous") -> LabelMap:
        """From ``(category id, name)`` pairs.

        ``contiguous``: labels 0..C-1 in category-id order. ``coco_official``: label = category id, with
        ``max id + 1`` slots and ``"N/A"`` names for unused ids (91 slots for COCO, as the official DETR / LW-DETR
        code and checkpoints have).
        """
        cats = sorted({int(i): str(n) for i, n in categories}.items())
        if mode not in LABEL_MAPS:
            raise DataError(f"unknown data.label_map {mode!r} (expected one of {', '.join(LABEL_MAPS)})")
        if any(i < 0 for i, _ in cats):
            raise DataError(f"negative category ids are not supported: {[i for i, _ in cats if i < 0]}")
        if mode == "contiguous":
            return cls([n for _, n in cats], [i for i, _ in cats], {i: k for k, (i, _) in enumerate(cats)})
        size = cats[-1][0] + 1 if cats else 0
        names = ["N/A"] * size
        for i, n in cats:
            names[i] = n
        return cls(names, list(range(size)), {i: i for i, _ in cats})


# ---------------------------------------------------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------------------------------------------------


def classify_box(box: Sequence[float], width: float, height: float) -> tuple[str | None, tuple[float, ...]]:
    """Check one ``xyxy`` box against an image of ``width`` x ``height``.

    Returns ``(problem, box)``: problem is ``None`` (fine), ``"clipped_box"`` (kept, clipped), or a dropping kind
    (``invalid_box``, ``degenerate_box``, ``box_outside_image``).
    """
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        return "invalid_box", (0.0, 0.0, 0.0, 0.0)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return "invalid_box", (x1, y1, x2, y2)
    if x2 - x1 < MIN_BOX_SIDE or y2 - y1 < MIN_BOX_SIDE:
        return "degenerate_box", (x1, y1, x2, y2)
    cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
    if cx2 - cx1 < MIN_BOX_SIDE or cy2 - cy1 < MIN_BOX_SIDE:
        return "box_outside_image", (x1, y1, x2, y2)
    if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
        return "clipped_box", (cx1, cy1, cx2, cy2)
    return None, (x1, y1, x2, y2)


@dataclass
class Record:
    """One image of a file-based data set, annotations already sanitised."""

    image_id: int
    path: Path
    file_name: str  # as written in the annotations (reports, coco_gt)
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32 xyxy absolute pixels
    labels: np.ndarray  # (N,) int64
    ignore_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # crowd / difficult
    ignore_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


class RecordBuilder:
    """Collects one image's raw annotations, sanitising and counting each box in the report."""

    def __init__(self, report: DataReport, label_map: LabelMap, file_name: str, width: int, height: int) -> None:
        self.report, self.label_map, self.file_name = report, label_map, file_name
        self.width, self.height = width, height
        self.boxes: list[tuple[float, ...]] = []
        self.labels: list[int] = []
        self.ignore: list[tuple[float, ...]] = []
        self.ignore_labels: list[int] = []

    def add(self, box: Sequence[float], category: Any, ignore_kind: str | None = None) -> str | None:
        """Add an ``xyxy`` box of raw category ``category``; ``ignore_kind`` ("crowd"/"difficult") excludes it from
        the targets. Returns the problem kind counted, if any."""
        self.report.boxes_in += 1
        label = self._label(category)
        if label is None:
            self.report.add("unknown_category", self.file_name)
            return "unknown_category"
        problem, clean = classify_box(box, self.width, self.height)
        if ignore_kind is not None:
            self.report.add(ignore_kind, self.file_name)
            if problem in (None, "clipped_box"):
                self.ignore.append(clean)
                self.ignore_labels.append(label)
            return ignore_kind
        if problem not in (None, "clipped_box"):
            self.report.add(problem, self.file_name)
            return problem
        if problem == "clipped_box":
            self.report.add("clipped_box", self.file_name)
        self.boxes.append(clean)
        self.labels.append(label)
        return problem

    def bad(self, kind: str = "bad_annotation") -> None:
        """Count an annotation that could not be parsed at all."""
        self.report.boxes_in += 1
        self.report.add(kind, self.file_name)

    def _label(self, category: Any) -> int | None:
        try:
            value = float(category)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(value) or value != int(value):
            return None
        return self.label_map.to_label.get(int(value))

    def build(self, image_id: int, path: Path) -> Record:
        boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        labels = np.asarray(self.labels, np.int64)
        # float32 rounding may shrink a box that was barely wide enough in float64
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not ok.all():
            self.report.add("degenerate_box", self.file_name, int((~ok).sum()))
            boxes, labels = boxes[ok], labels[ok]
        if len(labels) == 0:
            self.report.add("empty_image", self.file_name)
        self.report.add_kept(labels, boxes)
        self.report.num_images += 1
        return Record(
            image_id=image_id,
            path=path,
            file_name=self.file_name,
            width=int(self.width),
            height=int(self.height),
            boxes=boxes,
            labels=labels,
            ignore_boxes=np.asarray(self.ignore, np.float32).reshape(-1, 4),
            ignore_labels=np.asarray(self.ignore_labels, np.int64),
        )
