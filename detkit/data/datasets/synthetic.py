"""The built-in synthetic data set: coloured shapes on cluttered backgrounds, drawn on the fly.

Every image is a pure function of ``(seed, split, index)``: the layout (classes, boxes) comes from one random stream
and the pixels from another, so ground truth is known without drawing and two runs see identical data. The
validation split uses a different seed stream (``val_seed``, or ``seed`` with a split code), so it never repeats a
training image.

The task is made to be learnable by a small detector at 256-320 px within minutes on a CPU: clearly distinct shape
classes, saturated object colours on muted backgrounds, sizes of roughly 5-50% of the image side, 1-8 objects with
limited occlusion, and clutter made of texture, noise and thin lines (never shape-like distractors).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from detkit.data.datasets.base import DetectionDataset, Transform
from detkit.data.datasets.records import LabelMap
from detkit.data.report import DataReport
from detkit.errors import DataError
from detkit.registry import DATASETS

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
_SUB = 16  # cv2 fixed-point shift 4: points and boxes live on a 1/16 px grid (exact in float and json)


@dataclass(frozen=True)
class Obj:
    label: int
    polygon: np.ndarray | None  # (K, 2) float points on the 1/16 grid, None for circles/rings
    center: tuple[float, float]
    radius: float
    box: tuple[float, float, float, float]  # xyxy, tight around the drawn shape


def _polygon(shape: str, size: float, angle: float, rng: np.random.Generator) -> np.ndarray:
    """Outline of ``shape`` with bounding size about ``size``, rotated by ``angle`` radians, centred at 0."""
    r = size / 2
    if shape == "square":
        aspect = rng.uniform(0.7, 1.0)  # square-ish rectangles
        pts = np.array([[-r, -r * aspect], [r, -r * aspect], [r, r * aspect], [-r, r * aspect]])
    elif shape == "triangle":
        pts = np.array([[r * math.cos(a), r * math.sin(a)] for a in np.deg2rad([-90, 30, 150])])
    elif shape == "star":
        a = np.deg2rad(np.arange(10) * 36 - 90)
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        pts = np.stack([rad * np.cos(a), rad * np.sin(a)], 1)
    elif shape == "cross":
        t = r * 0.33
        pts = np.array([[-t, -r], [t, -r], [t, -t], [r, -t], [r, t], [t, t], [t, r], [-t, r], [-t, t], [-r, t],
                        [-r, -t], [-t, -t]])
    else:  # pragma: no cover - guarded by the shape list check
        raise ValueError(shape)
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


_MAX_ANGLE = {"square": 20, "triangle": 30, "star": 180, "cross": 20}


class SyntheticDataset(DetectionDataset):
    """Shapes data set (see the module docstring). ``ds.layout(i)`` gives the objects without drawing."""

    def __init__(
        self,
        num_images: int,
        seed: int,
        split_code: int,
        image_size: tuple[int, int],
        shapes: list[str],
        min_objects: int,
        max_objects: int,
        size_range: tuple[float, float],
        clutter: float,
        label_map: LabelMap,
        transforms: Transform | None,
        name: str,
    ) -> None:
        super().__init__(name, label_map, transforms, DataReport(name))
        self.num_images, self.seed, self.split_code = num_images, seed, split_code
        self.height, self.width = image_size
        self.shapes = list(shapes)
        self.min_objects, self.max_objects = min_objects, max_objects
        self.size_range, self.clutter = size_range, clutter
        self.report.num_images = num_images

    def __len__(self) -> int:
        return self.num_images

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.split_code, index, stream])

    # -- layout ---------------------------------------------------------------------------------------------------
    def layout(self, index: int) -> list[Obj]:
        rng = self._rng(index, 0)
        side = min(self.height, self.width)
        count = int(rng.integers(self.min_objects, self.max_objects + 1))
        objs: list[Obj] = []
        for _ in range(count):
            for _attempt in range(30):
                obj = self._sample_object(rng, side)
                if all(_occlusion_ok(o.box, obj.box) for o in objs):
                    objs.append(obj)
                    break
        return objs

    def _sample_object(self, rng: np.random.Generator, side: int) -> Obj:
        label = int(rng.integers(len(self.shapes)))
        shape = self.shapes[label]
        size = rng.uniform(*self.size_range) * side
        if shape in ("circle", "ring"):
            r = _grid(size / 2)
            cx = _grid(rng.uniform(r, self.width - r))
            cy = _grid(rng.uniform(r, self.height - r))
            return Obj(label, None, (cx, cy), r, (cx - r, cy - r, cx + r, cy + r))
        angle = math.radians(rng.uniform(-_MAX_ANGLE[shape], _MAX_ANGLE[shape]))
        pts = _polygon(shape, size, angle, rng)
        lo, hi = pts.min(0), pts.max(0)
        ox = rng.uniform(-lo[0], self.width - hi[0])
        oy = rng.uniform(-lo[1], self.height - hi[1])
        pts = np.clip(_grid(pts + [ox, oy]), 0, [self.width, self.height])
        lo, hi = pts.min(0), pts.max(0)
        box = (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))
        return Obj(label, pts, (float(ox), float(oy)), size / 2, box)

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        boxes, labels = _targets(self.layout(index))
        return boxes, labels, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)

    def image_info(self, index: int) -> dict[str, Any]:
        return {"id": index + 1, "file_name": f"{index:06d}.png", "width": self.width, "height": self.height}

    # -- pixels ---------------------------------------------------------------------------------------------------
    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        objs = self.layout(index)
        rng = self._rng(index, 1)
        img = self._background(rng)
        for obj in objs:
            self._draw(img, obj, rng)
        if self.clutter > 0:  # sensor-like noise over everything, objects included
            amp = max(1, int(round(10 * self.clutter)))
            noise = rng.integers(-amp, amp + 1, img.shape, dtype=np.int16)
            img = np.clip(img + noise, 0, 255).astype(np.uint8)
        boxes, labels = _targets(objs)
        return img, boxes, labels

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        h, w = self.height, self.width
        c0, c1 = _muted(rng), _muted(rng)
        t = np.linspace(0, 1, w if rng.random() < 0.5 else h, dtype=np.float32)
        ramp = t[None, :, None] if len(t) == w else t[:, None, None]
        img = c0 + (c1 - c0) * ramp + np.zeros((h, w, 3), np.float32)
        if self.clutter > 0:
            cells = int(rng.integers(3, 9))
            blobs = rng.normal(0, 22 * self.clutter, (cells, cells, 3)).astype(np.float32)
            img += cv2.resize(blobs, (w, h), interpolation=cv2.INTER_LINEAR)
            fine = rng.normal(0, 10 * self.clutter, (h // 4 + 1, w // 4 + 1, 1)).astype(np.float32)
            img += cv2.resize(fine, (w, h), interpolation=cv2.INTER_LINEAR)[..., None]
        img = np.clip(img, 0, 255).astype(np.uint8)
        n_lines = int(rng.integers(3, 14) * self.clutter) if self.clutter > 0 else 0
        for _ in range(n_lines):
            p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            colour = tuple(float(v) for v in _muted(rng, spread=70))
            thick = int(rng.integers(1, 3)) if min(h, w) >= 256 else 1  # keep clutter thin on small images
            cv2.line(img, p1, p2, colour, thick, cv2.LINE_AA)
        return img

    def _draw(self, img: np.ndarray, obj: Obj, rng: np.random.Generator) -> None:
        x1, y1, x2, y2 = (int(v) for v in obj.box)
        region = img[max(y1, 0):max(y2, y1 + 1), max(x1, 0):max(x2, x1 + 1)]
        under = region.reshape(-1, 3).mean(0) if region.size else np.full(3, 128.0)
        colour = _vivid(rng)
        for _ in range(8):  # never camouflaged: keep the colour well away from what it is drawn on
            if np.abs(colour - under).sum() > 120:
                break
            colour = _vivid(rng)
        col = tuple(float(v) for v in colour)
        outline = rng.random() < 0.3
        dark = tuple(float(v) * 0.4 for v in colour)
        shape = self.shapes[obj.label]
        if obj.polygon is None:
            c = (int(round(obj.center[0] * _SUB)), int(round(obj.center[1] * _SUB)))
            r = int(round(obj.radius * _SUB))
            if shape == "ring":  # a thick circle whose outer edge is the box edge
                thick = max(2, int(round(obj.radius * 0.35)))
                cv2.circle(img, c, r - thick * _SUB // 2, col, thick, cv2.LINE_AA, 4)
            else:
                cv2.circle(img, c, r, col, -1, cv2.LINE_AA, 4)
                if outline:  # inside the edge, so the box stays tight
                    cv2.circle(img, c, r - _SUB, dark, 2, cv2.LINE_AA, 4)
        else:
            pts = np.round(obj.polygon * _SUB).astype(np.int32)
            cv2.fillPoly(img, [pts], col, cv2.LINE_AA, 4)
            if outline:
                cv2.polylines(img, [pts], True, dark, 2, cv2.LINE_AA, 4)


def _targets(objs: list[Obj]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([o.box for o in objs], np.float32).reshape(-1, 4), np.array([o.label for o in objs], np.int64)


def _grid(v: Any) -> Any:
    return np.round(np.asarray(v, np.float64) * _SUB) / _SUB if isinstance(v, np.ndarray) else round(v * _SUB) / _SUB


def _occlusion_ok(old: tuple[float, ...], new: tuple[float, ...], limit: float = 0.45) -> bool:
    """The new (upper) object may cover at most ``limit`` of an older box, and overlap at most ``limit`` of itself."""
    iw = min(old[2], new[2]) - max(old[0], new[0])
    ih = min(old[3], new[3]) - max(old[1], new[1])
    if iw <= 0 or ih <= 0:
        return True
    inter = iw * ih
    area_old = (old[2] - old[0]) * (old[3] - old[1])
    area_new = (new[2] - new[0]) * (new[3] - new[1])
    return inter <= limit * area_old and inter <= limit * area_new


def _muted(rng: np.random.Generator, spread: float = 40) -> np.ndarray:
    """A low-saturation colour (greys, browns, dull tints)."""
    level = rng.uniform(60, 190)
    return np.clip(level + rng.uniform(-spread / 2, spread / 2, 3), 0, 255).astype(np.float32)


def _vivid(rng: np.random.Generator) -> np.ndarray:
    """A saturated colour of random hue (RGB, float)."""
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(160, 255), rng.uniform(140, 255)]]], np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


@DATASETS.register("synthetic")
def synthetic(
    split: str = "train",
    transforms: Transform | None = None,
    label_map: str = "contiguous",
    image_size: int | list[int] = 320,
    num_train: int = 2000,
    num_val: int = 200,
    seed: int = 0,
    val_seed: int | None = None,
    shapes: list[str] = ["circle", "square", "triangle"],  # noqa: B006 - never mutated; shown by `detkit show`
    min_objects: int = 1,
    max_objects: int = 8,
    size_range: list[float] = [0.06, 0.5],  # noqa: B006
    clutter: float = 1.0,
) -> SyntheticDataset:
    """The built-in shapes data set (options under ``data.synthetic``).

    ``image_size``: side of square images, or ``[h, w]``. ``shapes``: class names, a subset of
    circle, square, triangle, star, cross, ring (label = position in the list). ``size_range``: object size as a
    fraction of the shorter image side. ``clutter``: strength of background texture, noise and lines (0 = plain).
    ``val_seed``: seed of the validation split (default: ``seed`` on a separate stream).
    """
    if split == "train":
        num, seed_, code = num_train, seed, 0
    elif split in ("val", "valid", "validation", "test"):
        num, seed_, code = num_val, (seed if val_seed is None else val_seed), 1
    else:
        raise DataError(f"synthetic data set has splits 'train' and 'val', not {split!r}")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(v) for v in image_size)
    unknown = [s for s in shapes if s not in SHAPES]
    problems = []
    if len(size) != 2 or min(size) < 32:
        problems.append(f"image_size must be an int or [h, w] of at least 32, got {image_size!r}")
    if unknown or not shapes or len(set(shapes)) != len(shapes):
        problems.append(f"shapes must be distinct names from {', '.join(SHAPES)}; got {shapes!r}")
    if not 1 <= min_objects <= max_objects:
        problems.append(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if len(size_range) != 2 or not 0 < size_range[0] <= size_range[1] <= 1:
        problems.append(f"size_range must be [lo, hi] with 0 < lo <= hi <= 1, got {size_range!r}")
    if num < 1:
        problems.append(f"the {split} split needs at least one image, got {num}")
    if problems:
        raise DataError("data.synthetic: " + "; ".join(problems))
    lm = LabelMap.build([(i + 1, s) for i, s in enumerate(shapes)], label_map)
    return SyntheticDataset(
        num, seed_, code, size, list(shapes), min_objects, max_objects, (float(size_range[0]), float(size_range[1])),
        float(clutter), lm, transforms, name=f"synthetic/{split}",
    )


def write_coco(datasets: dict[str, SyntheticDataset], out: Path) -> dict[str, Path]:
    """Write each split as ``out/<split>2017/*.png`` + ``out/annotations/instances_<split>2017.json``."""
    written = {}
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, ds in datasets.items():
        image_dir = out / f"{split}2017"
        image_dir.mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(len(ds)):
            image, boxes, labels = ds.read(i)
            info = ds.image_info(i)
            if not cv2.imwrite(str(image_dir / info["file_name"]), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
                raise DataError(f"cannot write {image_dir / info['file_name']}")
            images.append({"id": info["id"], "file_name": info["file_name"], "width": info["width"],
                           "height": info["height"]})
            for box, label in zip(boxes.tolist(), labels.tolist()):
                w, h = box[2] - box[0], box[3] - box[1]
                anns.append({"id": len(anns) + 1, "image_id": info["id"], "category_id": ds.cat_ids[label],
                             "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
        path = out / "annotations" / f"instances_{split}2017.json"
        data = {"images": images, "annotations": anns, "categories": ds.categories(),
                "info": {"description": f"detkit synthetic shapes, seed {ds.seed}"}}
        path.write_text(json.dumps(data))
        written[split] = path
    return written
