"""COCO json data sets, in the COCO 2017 layout or the common export layout.

COCO 2017::

    ROOT/annotations/instances_train2017.json   ROOT/train2017/*.jpg
    ROOT/annotations/instances_val2017.json     ROOT/val2017/*.jpg

Export layout (Roboflow and others)::

    ROOT/train/_annotations.coco.json + images    ROOT/valid/...    ROOT/test/...
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from detkit.data.datasets.base import (
    IMAGE_ERRORS,
    RecordDataset,
    Transform,
    make_coco,
    probe_image,
    split_aliases,
)
from detkit.data.datasets.records import LabelMap, RecordBuilder, classify_box
from detkit.data.report import DataReport
from detkit.errors import DataError
from detkit.registry import DATASETS


def coco_split_paths(root: Path, split: str) -> tuple[Path, Path]:
    """``(annotation file, image folder)`` of ``split`` under ``root``; a :class:`DataError` lists what was tried."""
    tried = []
    for name in split_aliases(split):
        for ann, img in (
            (root / "annotations" / f"instances_{name}2017.json", root / f"{name}2017"),
            (root / "annotations" / f"instances_{name}.json", root / name),
            (root / name / "_annotations.coco.json", root / name),
        ):
            if ann.is_file():
                return ann, img if img.is_dir() else root
            tried.append(str(ann))
    raise DataError(f"COCO annotation file for split {split!r} not found under {root}; looked for: {', '.join(tried)}")


def looks_like_coco(root: Path) -> bool:
    return any((root / "annotations").glob("instances_*.json")) or any(root.glob("*/_annotations.coco.json"))


def load_coco_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise DataError(f"COCO annotation file not found: {path}") from e
    except (OSError, ValueError) as e:
        raise DataError(f"cannot parse COCO annotation file {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path} is not a COCO detection file (no 'images' list)")
    for key in ("annotations", "categories"):
        if not isinstance(data.get(key, []), list):
            raise DataError(f"{path}: '{key}' must be a list")
    return data


def coco_categories(data: dict[str, Any], path: Path) -> list[tuple[int, str]]:
    cats = []
    for c in data.get("categories", []):
        try:
            cats.append((int(c["id"]), str(c.get("name", c["id"]))))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: bad category entry {c!r}") from e
    if not cats:
        raise DataError(f"{path} has no categories")
    return cats


def _xyxy(bbox: Any) -> list[float] | None:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    return [x, y, x + w, y + h]


class CocoDataset(RecordDataset):
    """A COCO json split. ``coco_gt()`` is the original json (minus unusable annotations) for faithful COCOeval."""

    def __init__(self, ann_file: Path, image_dir: Path, label_map: LabelMap | str, transforms: Transform | None,
                 name: str) -> None:
        self.ann_file = ann_file
        self.image_dir = image_dir
        report = DataReport(name)
        data = load_coco_json(ann_file)
        if isinstance(label_map, str):
            label_map = LabelMap.build(coco_categories(data, ann_file), label_map)
        by_image: dict[Any, list[dict]] = defaultdict(list)
        for ann in data.get("annotations", []):
            by_image[ann.get("image_id") if isinstance(ann, dict) else None].append(ann)
        records = []
        for entry in data["images"]:
            try:
                image_id, file_name = int(entry["id"]), str(entry["file_name"])
            except (KeyError, TypeError, ValueError):
                report.add("bad_annotation_file", str(entry)[:80])
                continue
            anns = by_image.pop(entry["id"], [])
            path = self._image_path(file_name)
            width, height = entry.get("width"), entry.get("height")
            if not path.is_file():
                report.add("missing_image", file_name)
                report.boxes_in += len(anns)
                report.add("boxes_of_dropped_images", file_name, len(anns))
                continue
            if not (isinstance(width, (int, float)) and isinstance(height, (int, float)) and width > 0 and height > 0):
                try:
                    width, height = probe_image(path)
                except IMAGE_ERRORS:
                    report.add("unreadable_image", file_name)
                    report.boxes_in += len(anns)
                    report.add("boxes_of_dropped_images", file_name, len(anns))
                    continue
            builder = RecordBuilder(report, label_map, file_name, width, height)
            for ann in anns:
                box = _xyxy(ann.get("bbox")) if isinstance(ann, dict) else None
                if box is None:
                    builder.bad()
                    continue
                crowd = "crowd" if ann.get("iscrowd", 0) else None
                builder.add(box, ann.get("category_id"), ignore_kind=crowd)
            records.append(builder.build(image_id, path))
        for image_id, anns in by_image.items():  # annotations of images that are not listed
            report.boxes_in += len(anns)
            report.add("orphan_annotation", f"image_id={image_id}", len(anns))
        super().__init__(name, records, label_map, transforms, report)

    def _image_path(self, file_name: str) -> Path:
        path = self.image_dir / file_name
        if not path.is_file() and (self.image_dir.parent / file_name).is_file():
            return self.image_dir.parent / file_name
        return path

    def coco_gt(self):  # noqa: ANN201 - pycocotools.coco.COCO
        """The original annotations of this split's images, minus annotations that cannot be evaluated."""
        data = load_coco_json(self.ann_file)
        kept = {r.image_id: r for r in self.records}
        images = [dict(e) for e in data["images"] if _int_or_none(e.get("id")) in kept]
        for e in images:
            e["id"] = int(e["id"])
            e["width"], e["height"] = kept[e["id"]].width, kept[e["id"]].height
        known = set(self.label_map.to_label)
        anns = []
        for ann in data.get("annotations", []):
            if not isinstance(ann, dict) or _int_or_none(ann.get("image_id")) not in kept:
                continue
            box = _xyxy(ann.get("bbox"))
            rec = kept[int(ann["image_id"])]
            if box is None or _int_or_none(ann.get("category_id")) not in known:
                continue
            problem, _ = classify_box(box, rec.width, rec.height)
            if problem not in (None, "clipped_box"):
                continue
            ann = dict(ann)
            ann["image_id"], ann["category_id"] = int(ann["image_id"]), int(ann["category_id"])
            ann.setdefault("area", (box[2] - box[0]) * (box[3] - box[1]))
            ann.setdefault("iscrowd", 0)
            ann.pop("segmentation", None)  # not needed for box AP, and may be malformed
            anns.append(ann)
        ids = [a.get("id") for a in anns]
        if len(set(ids)) != len(ids) or not all(isinstance(i, int) and i > 0 for i in ids):
            for k, a in enumerate(anns):
                a["id"] = k + 1
        return make_coco(images, anns, self.categories())


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@DATASETS.register("coco")
def coco(
    root: str,
    split: str = "train",
    transforms: Transform | None = None,
    label_map: str = "contiguous",
    reference: Any = None,
) -> CocoDataset:
    """A COCO json split under ``root`` (2017 or export layout, see the module docstring).

    ``label_map``: ``contiguous`` (labels 0..C-1) or ``coco_official`` (label = category id). ``reference``: a data
    set built before (the train split) whose class map this one reuses, so both splits agree on labels.
    """
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DataError(f"data root does not exist or is not a folder: {root_path}")
    ann_file, image_dir = coco_split_paths(root_path, split)
    lm = reference.label_map if reference is not None else label_map
    return CocoDataset(ann_file, image_dir, lm, transforms, name=f"coco/{split}")
