"""Helpers of the data tests: write small COCO / YOLO / VOC data sets from one image spec, and check targets.

An image spec is ``Img(name, w, h, anns, mode, exif, state)`` with annotations ``(x, y, w, h, cat, crowd)`` in
upright pixels; category ids are 1..3 for the classes ``a, b, c`` (any other id is unknown). The same spec written in
every format must load to the same targets: label = cat - 1, boxes clipped to the image.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASSES = ["a", "b", "c"]
CATEGORIES = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]


@dataclass
class Img:
    name: str
    w: int
    h: int
    anns: list[tuple[float, float, float, float, int, bool]] = field(default_factory=list)
    mode: str = "RGB"
    exif: int = 1  # EXIF orientation tag; 6 = stored rotated, upright after exif_transpose
    state: str = "ok"  # ok | garbage (undecodable bytes) | missing (file not written)


def test_support_writes_every_format(tmp_path: Path) -> None:
    """The helpers write files each loader can find (a smoke test of the test helpers themselves)."""
    spec = [Img("a.jpg", 20, 10, [(1, 1, 5, 5, 1, False)])]
    write_coco(tmp_path / "c", {"train": spec})
    write_yolo(tmp_path / "y", {"train": spec})
    write_voc(tmp_path / "v", {"train": spec})
    assert (tmp_path / "c/annotations/instances_train2017.json").is_file()
    assert (tmp_path / "y/labels/train/a.txt").is_file()
    assert (tmp_path / "v/Annotations/a.xml").is_file()


def pixels(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth test picture (survives JPEG): red grows with x, green with y, blue set by ``seed``."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return np.stack([x, y, np.full((h, w), (seed * 37) % 256)], -1).astype(np.uint8)


def save_image(path: Path, img: Img, seed: int = 0) -> None:
    """Write ``img`` at ``path`` in its mode / EXIF orientation / state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if img.state == "missing":
        return
    if img.state == "garbage":
        path.write_bytes(b"this is not an image" * 5)
        return
    rgb = Image.fromarray(pixels(img.w, img.h, seed))
    if img.exif != 1:
        # store the pixels rotated so that applying the EXIF orientation brings back the upright w x h image
        stored = rgb.transpose(Image.Transpose.ROTATE_90) if img.exif == 6 else rgb
        exif = Image.Exif()
        exif[0x0112] = img.exif
        stored.save(path, format="JPEG", exif=exif.tobytes(), quality=95, subsampling=0)
        return
    if img.mode == "I;16":
        arr = (np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16)
        Image.fromarray(arr).save(path, format="PNG")  # uint16 -> mode I;16
        return
    out = rgb.convert(img.mode) if img.mode != "RGB" else rgb
    fmt = "JPEG" if img.mode in ("CMYK",) else "PNG"
    out.save(path, format=fmt)


def write_coco(root: Path, splits: dict[str, list[Img]], layout: str = "2017") -> None:
    for split, images in splits.items():
        if layout == "2017":
            ann_file, image_dir = root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017"
        else:
            name = {"val": "valid"}.get(split, split)
            ann_file, image_dir = root / name / "_annotations.coco.json", root / name
        ann_file.parent.mkdir(parents=True, exist_ok=True)
        imgs, anns = [], []
        for k, img in enumerate(images):
            save_image(image_dir / img.name, img, seed=k)
            imgs.append({"id": k + 1, "file_name": img.name, "width": img.w, "height": img.h})
            for x, y, w, h, cat, crowd in img.anns:
                anns.append({"id": len(anns) + 1, "image_id": k + 1, "category_id": cat, "bbox": [x, y, w, h],
                             "area": abs(w * h) if math.isfinite(w * h) else 0.0, "iscrowd": int(crowd)})
        # json.dumps writes NaN / Infinity, which Python's json (and most exporters' readers) accept
        ann_file.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": CATEGORIES}))


def write_yolo(root: Path, splits: dict[str, list[Img]]) -> None:
    (root / "data.yaml").parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{s}: images/{s}" for s in splits] + [f"names: {CLASSES}"]
    (root / "data.yaml").write_text("\n".join(lines) + "\n")
    for split, images in splits.items():
        for k, img in enumerate(images):
            save_image(root / "images" / split / img.name, img, seed=k)
            label = root / "labels" / split / (Path(img.name).stem + ".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            rows = []
            for x, y, w, h, cat, _crowd in img.anns:  # YOLO has no crowd flag
                cx, cy = (x + w / 2) / img.w, (y + h / 2) / img.h
                rows.append(f"{cat - 1} {cx!r} {cy!r} {w / img.w!r} {h / img.h!r}")
            label.write_text("\n".join(rows) + ("\n" if rows else ""))


def write_voc(root: Path, splits: dict[str, list[Img]]) -> None:
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for split, images in splits.items():
        ids = []
        for k, img in enumerate(images):
            key = Path(img.name).stem
            ids.append(key)
            save_image(root / "JPEGImages" / img.name, img, seed=k)
            objs = []
            for x, y, w, h, cat, crowd in img.anns:
                name = CLASSES[cat - 1] if 1 <= cat <= len(CLASSES) else f"unknown{cat}"
                objs.append(
                    f"<object><name>{name}</name><difficult>{int(crowd)}</difficult><bndbox>"
                    f"<xmin>{x + 1!r}</xmin><ymin>{y + 1!r}</ymin><xmax>{x + w!r}</xmax><ymax>{y + h!r}</ymax>"
                    "</bndbox></object>"
                )
            xml = (f"<annotation><filename>{img.name}</filename><size><width>{img.w}</width><height>{img.h}</height>"
                   f"<depth>3</depth></size>{''.join(objs)}</annotation>")
            (root / "Annotations" / f"{key}.xml").write_text(xml)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")


WRITERS = {
    "coco": write_coco,
    "coco_export": lambda root, splits: write_coco(root, splits, layout="export"),
    "yolo": write_yolo,
    "voc": write_voc,
}


def expected_boxes(img: Img, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Independent oracle: the clipped ``xyxy`` boxes and labels a loader must keep for ``img`` in ``fmt``."""
    boxes, labels = [], []
    for x, y, w, h, cat, crowd in img.anns:
        if crowd and fmt != "yolo":
            continue
        if not 1 <= cat <= len(CLASSES):
            continue
        x1, y1, x2, y2 = x, y, x + w, y + h
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 - x1 < 0.01 or y2 - y1 < 0.01:
            continue
        x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, img.w), min(y2, img.h)
        if x2 - x1 < 0.01 or y2 - y1 < 0.01:
            continue
        boxes.append((x1, y1, x2, y2))
        labels.append(cat - 1)
    return np.array(boxes, np.float64).reshape(-1, 4), np.array(labels, np.int64)


def xyxy_pixels(target: dict) -> np.ndarray:
    """Target boxes (cxcywh normalised) back to ``xyxy`` pixels of the transformed image."""
    h, w = target["size"].tolist()
    b = target["boxes"].double().numpy()
    return np.stack([(b[:, 0] - b[:, 2] / 2) * w, (b[:, 1] - b[:, 3] / 2) * h,
                     (b[:, 0] + b[:, 2] / 2) * w, (b[:, 1] + b[:, 3] / 2) * h], 1) if len(b) else np.zeros((0, 4))


def assert_valid_target(image: torch.Tensor, target: dict, num_classes: int) -> None:
    """Every contract of a target: dtypes, shapes, finite boxes of positive size inside the image."""
    assert image.dtype == torch.float32 and image.ndim == 3 and image.shape[0] == 3
    assert torch.isfinite(image).all()
    assert target["size"].tolist() == list(image.shape[1:])
    assert target["orig_size"].dtype == torch.int64 and target["size"].dtype == torch.int64
    assert isinstance(target["image_id"], int)
    boxes, labels = target["boxes"], target["labels"]
    assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
    assert boxes.shape == (len(labels), 4)
    assert torch.isfinite(boxes).all()
    assert (boxes[:, 2:] > 0).all(), boxes
    assert (boxes[:, :2] - boxes[:, 2:] / 2 >= -1e-5).all() and (boxes[:, :2] + boxes[:, 2:] / 2 <= 1 + 1e-5).all()
    assert ((labels >= 0) & (labels < num_classes)).all()


def image_bytes(mode: str = "RGB", size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()
