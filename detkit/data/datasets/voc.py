"""Pascal VOC XML data sets (VOC2007 layout).

::

    ROOT/Annotations/<id>.xml   ROOT/JPEGImages/<id>.jpg   ROOT/ImageSets/Main/{train,val,trainval,test}.txt

``ROOT`` may also be a ``VOCdevkit`` folder holding exactly one ``VOC*`` folder. VOC pixel indices are 1-based and
inclusive, so ``<xmin>`` becomes ``xmin - 1`` (and ``ymin - 1``) in continuous pixel coordinates. ``difficult``
objects are excluded from the training targets and kept as ignore regions for evaluation.

Class names: ``data.classes`` when given; otherwise the 20 standard VOC classes (in their usual order) when they
cover every name found under ``Annotations/``, else the sorted names found. Category ids are 1..C.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from detkit.data.datasets.base import (
    IMAGE_ERRORS,
    RecordDataset,
    Transform,
    probe_image,
    split_aliases,
)
from detkit.data.datasets.records import LabelMap, RecordBuilder
from detkit.data.report import DataReport
from detkit.errors import DataError
from detkit.registry import DATASETS

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
_NAME = re.compile(r"<object>.*?<name>\s*(.*?)\s*</name>", re.S)


def voc_root(root: Path) -> Path:
    """``root`` itself, or its single ``VOC*`` sub-folder (a ``VOCdevkit``)."""
    if (root / "Annotations").is_dir():
        return root
    subs = [p for p in root.glob("VOC*") if (p / "Annotations").is_dir()]
    if len(subs) == 1:
        return subs[0]
    raise DataError(
        f"VOC folders not found under {root}; looked for {root / 'Annotations'} and {root / 'VOC*/Annotations'}"
        + (f" (found several: {', '.join(p.name for p in subs)}; point data.root at one)" if subs else "")
    )


def looks_like_voc(root: Path) -> bool:
    try:
        base = voc_root(root)
    except DataError:
        return False
    return (base / "JPEGImages").is_dir() or (base / "ImageSets" / "Main").is_dir()


def _names_found(annotations_dir: Path) -> tuple[str, ...]:
    names: set[str] = set()
    for xml in annotations_dir.glob("*.xml"):
        try:
            names.update(_NAME.findall(xml.read_text(encoding="utf-8", errors="replace")))
        except OSError:
            continue
    return tuple(sorted(names))


def voc_classes(base: Path, classes: list[str] | None) -> list[str]:
    if classes:
        if len(set(classes)) != len(classes):
            raise DataError(f"data.classes has duplicate names: {classes}")
        return list(classes)
    found = _names_found(base / "Annotations")
    if set(found) <= set(VOC_CLASSES):
        return list(VOC_CLASSES)
    return list(found)


def _text(node: ET.Element | None, tag: str) -> str | None:
    child = node.find(tag) if node is not None else None
    return child.text.strip() if child is not None and child.text is not None else None


def _float(value: str | None) -> float:
    try:
        return float(value) if value is not None else float("nan")
    except ValueError:
        return float("nan")


class VocDataset(RecordDataset):
    """A VOC split listed in ``ImageSets/Main/<split>.txt``."""

    def __init__(self, base: Path, ids: list[str], label_map: LabelMap, transforms: Transform | None,
                 name: str) -> None:
        report = DataReport(name)
        name_to_id = {n: c for n, c in zip(label_map.classes, label_map.cat_ids)}
        records = []
        for k, image_key in enumerate(ids):
            xml_path = base / "Annotations" / f"{image_key}.xml"
            try:
                tree = ET.parse(xml_path).getroot()
            except (OSError, ET.ParseError):
                report.add("bad_annotation_file", xml_path.name)
                continue
            objects = tree.findall("object")
            file_name = _text(tree, "filename") or f"{image_key}.jpg"
            path = base / "JPEGImages" / file_name
            if not path.is_file() and (base / "JPEGImages" / f"{image_key}.jpg").is_file():
                path = base / "JPEGImages" / f"{image_key}.jpg"
            size = tree.find("size")
            width, height = _float(_text(size, "width")), _float(_text(size, "height"))
            kind = None
            if not path.is_file():
                kind = "missing_image"
            elif not (width > 0 and height > 0):  # also false for NaN
                try:
                    width, height = probe_image(path)
                except IMAGE_ERRORS:
                    kind = "unreadable_image"
            if kind is not None:
                report.add(kind, path.name)
                report.boxes_in += len(objects)
                report.add("boxes_of_dropped_images", path.name, len(objects))
                continue
            builder = RecordBuilder(report, label_map, path.name, int(width), int(height))
            for obj in objects:
                box_node = obj.find("bndbox")
                if box_node is None:
                    builder.bad()
                    continue
                box = [_float(_text(box_node, t)) for t in ("xmin", "ymin", "xmax", "ymax")]
                box[0] -= 1.0
                box[1] -= 1.0
                difficult = _text(obj, "difficult") in ("1", "true", "True")
                cat = name_to_id.get(_text(obj, "name") or "")
                builder.add(box, cat, ignore_kind="difficult" if difficult else None)
            records.append(builder.build(k + 1, path))
        super().__init__(name, records, label_map, transforms, report)


@DATASETS.register("voc")
def voc(
    root: str,
    split: str = "train",
    transforms: Transform | None = None,
    label_map: str = "contiguous",
    classes: list[str] | None = None,
    reference: Any = None,
) -> VocDataset:
    """A Pascal VOC split (see the module docstring); ``classes`` fixes the class list and order."""
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DataError(f"data root does not exist or is not a folder: {root_path}")
    base = voc_root(root_path)
    tried = [base / "ImageSets" / "Main" / f"{s}.txt" for s in split_aliases(split)]
    list_file = next((p for p in tried if p.is_file()), None)
    if list_file is None:
        raise DataError(f"VOC split list not found; looked for: {', '.join(map(str, tried))}")
    ids = [line.split()[0] for line in list_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if reference is not None:
        lm = reference.label_map
    else:
        names = voc_classes(base, classes)
        lm = LabelMap.build([(i + 1, n) for i, n in enumerate(names)], label_map)
    return VocDataset(base, ids, lm, transforms, name=f"voc/{split}")
