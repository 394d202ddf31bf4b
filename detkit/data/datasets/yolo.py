"""YOLO txt data sets (Ultralytics layout).

``ROOT/data.yaml`` names the classes and the image folders (or ``.txt`` lists of images) of each split::

    path: .            # optional base folder (relative to the yaml; an absolute path that is gone falls back to ROOT)
    train: images/train
    val: images/val
    names: [cat, dog]  # or {0: cat, 1: dog}

Each image ``.../images/.../x.jpg`` has ``.../labels/.../x.txt`` with one ``class cx cy w h`` line per box,
normalised to [0, 1] (a polygon ``class x1 y1 x2 y2 ...`` line gives its bounding box). A missing label file means
an image without objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from detkit.data.datasets.base import (
    IMAGE_ERRORS,
    RecordDataset,
    Transform,
    as_mapping,
    probe_image,
    split_aliases,
)
from detkit.data.datasets.records import LabelMap, RecordBuilder
from detkit.data.report import DataReport
from detkit.errors import DataError
from detkit.registry import DATASETS

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm", ".ppm"}
YAML_NAMES = ("data.yaml", "dataset.yaml", "data.yml")


def find_yolo_yaml(root: Path) -> Path | None:
    for name in YAML_NAMES:
        if (root / name).is_file():
            return root / name
    return None


def load_yolo_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"cannot read YOLO data file {path}: {e}") from e
    data = dict(as_mapping(data, f"YOLO data file {path}"))
    if "names" not in data:
        raise DataError(f"YOLO data file {path} has no 'names' (the class names)")
    return data


def yolo_categories(data: dict[str, Any], path: Path) -> list[tuple[int, str]]:
    names = data["names"]
    if isinstance(names, list):
        return [(i, str(n)) for i, n in enumerate(names)]
    if isinstance(names, dict):
        try:
            return [(int(k), str(v)) for k, v in names.items()]
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: 'names' keys must be class ids") from e
    raise DataError(f"{path}: 'names' must be a list or a mapping, got {type(names).__name__}")


def label_path(image: Path) -> Path:
    """Ultralytics convention: the last ``/images/`` of the path becomes ``/labels/``, suffix ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def list_images(entry: Any, base: Path, yaml_path: Path, split: str) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    images: list[Path] = []
    for item in entries:
        p = Path(str(item)).expanduser()
        p = p if p.is_absolute() else base / p
        if p.is_dir():
            images += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line:
                    q = Path(line)
                    images.append(q if q.is_absolute() else (p.parent / q if line.startswith(".") else base / q))
        else:
            raise DataError(f"YOLO split {split!r} of {yaml_path} points to {p}, which does not exist")
    return images


class YoloDataset(RecordDataset):
    """A YOLO split; image sizes come from the image headers (labels are normalised)."""

    def __init__(self, images: list[Path], base: Path, label_map: LabelMap, transforms: Transform | None,
                 name: str) -> None:
        report = DataReport(name)
        records = []
        for k, path in enumerate(images):
            try:
                file_name = str(path.relative_to(base))
            except ValueError:
                file_name = str(path)
            lines = self._read_lines(label_path(path), report, file_name)
            if lines is None:
                continue
            try:
                width, height = probe_image(path)
            except FileNotFoundError:
                kind = "missing_image"
            except IMAGE_ERRORS:
                kind = "unreadable_image"
            else:
                kind = None
            if kind is not None:
                report.add(kind, file_name)
                report.boxes_in += len(lines)
                report.add("boxes_of_dropped_images", file_name, len(lines))
                continue
            builder = RecordBuilder(report, label_map, file_name, width, height)
            for fields in lines:
                self._add_line(builder, fields, width, height)
            records.append(builder.build(k + 1, path))
        super().__init__(name, records, label_map, transforms, report)

    @staticmethod
    def _read_lines(path: Path, report: DataReport, file_name: str) -> list[list[str]] | None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []  # no label file: background image
        except (OSError, UnicodeDecodeError):
            report.add("bad_annotation_file", file_name)
            return None
        return [line.split() for line in text.splitlines() if line.strip()]

    @staticmethod
    def _add_line(builder: RecordBuilder, fields: list[str], width: int, height: int) -> None:
        try:
            float(fields[0])  # a class id that is not a number is a malformed line; 1.5 or 99 are unknown ids
            values = [float(v) for v in fields[1:]]
        except ValueError:
            builder.bad()
            return
        if len(values) == 4:
            cx, cy, w, h = values
            box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
        elif len(values) >= 6 and len(values) % 2 == 0:  # polygon: its bounding box
            xs, ys = values[0::2], values[1::2]
            box = [min(xs) * width, min(ys) * height, max(xs) * width, max(ys) * height]
        else:
            builder.bad()
            return
        builder.add(box, fields[0])


def yolo_split(root: Path, split: str) -> tuple[Path, dict[str, Any], Path, list[Path]]:
    """``(yaml path, yaml data, base folder, image paths)`` of ``split``."""
    yaml_path = find_yolo_yaml(root)
    if yaml_path is None:
        raise DataError(f"YOLO data file not found under {root}; looked for: {', '.join(YAML_NAMES)}")
    data = load_yolo_yaml(yaml_path)
    base = root
    if data.get("path"):
        p = Path(str(data["path"])).expanduser()
        p = p if p.is_absolute() else yaml_path.parent / p
        base = p if p.is_dir() else root
    for key in split_aliases(split):
        if data.get(key):
            return yaml_path, data, base, list_images(data[key], base, yaml_path, split)
    raise DataError(f"YOLO data file {yaml_path} has no split {split!r} (looked for keys: {split_aliases(split)})")


@DATASETS.register("yolo")
def yolo(
    root: str,
    split: str = "train",
    transforms: Transform | None = None,
    label_map: str = "contiguous",
    reference: Any = None,
) -> YoloDataset:
    """A YOLO txt split described by ``root/data.yaml`` (see the module docstring)."""
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DataError(f"data root does not exist or is not a folder: {root_path}")
    yaml_path, data, base, images = yolo_split(root_path, split)
    lm = reference.label_map if reference is not None else LabelMap.build(yolo_categories(data, yaml_path), label_map)
    return YoloDataset(images, base, lm, transforms, name=f"yolo/{split}")

