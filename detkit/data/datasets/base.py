"""What every detection data set shares: image decoding and ``__getitem__``.

A format module only parses its annotation files into :class:`~detkit.data.datasets.records.Record` objects (boxes in
absolute ``xyxy`` pixels of the upright image, already sanitised by :mod:`detkit.data.datasets.records` and counted in
the :class:`~detkit.data.report.DataReport`); reading images, replacing unreadable ones, transforming and building
targets happens here, the same way for every format.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from detkit.data.datasets.records import MIN_BOX_SIDE, LabelMap, Record
from detkit.data.report import DataReport
from detkit.errors import DataError

if TYPE_CHECKING:
    from pycocotools.coco import COCO

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------------


class UnreadableImage(Exception):
    """Internal: the image of a sample cannot be used; the data set returns another sample."""


#: what PIL (and its plugins) raise on corrupt, truncated or hostile files
IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, IndexError, KeyError, TypeError,
)


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # broken EXIF blocks are common; they must not make the image unreadable
        return 1


def probe_image(path: Path) -> tuple[int, int]:
    """``(width, height)`` of the upright image (EXIF orientation applied) from the file header only."""
    with Image.open(path) as img:
        w, h = img.size
        if _exif_orientation(img) in (5, 6, 7, 8):
            w, h = h, w
    if w <= 0 or h <= 0:
        raise ValueError(f"image has size {w}x{h}")
    return w, h


def to_rgb(img: Image.Image) -> tuple[Image.Image, bool]:
    """Convert any PIL mode to RGB; returns ``(image, converted)``."""
    mode = img.mode
    if mode == "RGB":
        return img, False
    if mode in ("I", "F") or mode.startswith("I;"):
        arr = np.asarray(img, dtype=np.float64)
        top = float(np.nanmax(arr)) if arr.size else 0.0
        if top > 255:  # 16-bit data: scale to 8 bits
            arr = arr * (255.0 / (65535.0 if top <= 65535 else top))
        arr = np.nan_to_num(arr, nan=0.0)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    elif mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB"), True


def read_rgb(path: Path) -> tuple[np.ndarray, list[str]]:
    """Decode ``path`` as an upright RGB ``uint8`` array ``(H, W, 3)``; notes are report kinds that applied."""
    notes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns on odd EXIF / palette data; we count problems ourselves
        with Image.open(path) as img:
            img.load()
            if _exif_orientation(img) != 1:
                img = ImageOps.exif_transpose(img)
                notes.append("exif_rotated")
            img, converted = to_rgb(img)
    if converted:
        notes.append("converted_to_rgb")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"decoded image has shape {arr.shape}")
    return np.ascontiguousarray(arr), notes


_MEAN_255 = np.array(IMAGENET_MEAN, np.float32) * 255
_INV_STD_255 = 1.0 / (np.array(IMAGENET_STD, np.float32) * 255)


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """``uint8 (H, W, 3)`` -> ``float32 (3, H, W)`` normalised with the ImageNet mean and std."""
    # per-channel numpy on contiguous planes: several times faster than torch ops on a permuted HWC view
    planes = [(image[:, :, c].astype(np.float32) - _MEAN_255[c]) * _INV_STD_255[c] for c in range(3)]
    return torch.from_numpy(np.stack(planes))


# ---------------------------------------------------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------------------------------------------------

Transform = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[torch.Tensor, np.ndarray, np.ndarray]]


class DetectionDataset(Dataset, abc.ABC):
    """Base of every data set: ``ds[i] -> (image (3, H, W) normalised, target dict)``.

    Subclasses implement ``__len__``, :meth:`image_info`, :meth:`annotations` and :meth:`read`.
    """

    def __init__(
        self, name: str, label_map: LabelMap, transforms: Transform | None, report: DataReport | None = None
    ) -> None:
        self.name = name
        self.label_map = label_map
        self.classes: list[str] = list(label_map.classes)
        self.cat_ids: list[int] = list(label_map.cat_ids)
        self.transforms = transforms
        self.report = report if report is not None else DataReport(name)
        self._bad: set[int] = set()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_map(self) -> dict[str, Any]:
        """``{"classes": [...], "cat_ids": [...]}``: what a checkpoint stores to map labels back to categories."""
        return {"classes": list(self.classes), "cat_ids": list(self.cat_ids)}

    # -- to implement ---------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of images."""

    @abc.abstractmethod
    def image_info(self, index: int) -> dict[str, Any]:
        """``{"id", "file_name", "width", "height"}`` without decoding the image."""

    @abc.abstractmethod
    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(boxes xyxy, labels, ignore_boxes, ignore_labels)`` in original pixels, without decoding the image."""

    @abc.abstractmethod
    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(image uint8 (H, W, 3), boxes (N, 4) xyxy float32, labels (N,) int64)``; raise :class:`UnreadableImage`."""

    # -- shared ---------------------------------------------------------------------------------------------------
    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {self.name} with {n} images")
        index %= n
        # an unreadable image is replaced by the next readable one (deterministic, so every epoch sees the same data)
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                continue
            try:
                image, boxes, labels = self.read(j)
            except UnreadableImage:
                self._bad.add(j)
                continue
            return self._finish(j, image, boxes, labels)
        raise DataError(f"{self.name}: none of the {n} images can be read (see the warnings above)")

    def _finish(
        self, index: int, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        orig_h, orig_w = image.shape[:2]
        if self.transforms is not None:
            tensor, boxes, labels = self.transforms(image, boxes, labels)
        else:
            tensor = normalize_image(image)
        h, w = int(tensor.shape[1]), int(tensor.shape[2])
        boxes = np.clip(np.asarray(boxes, np.float64).reshape(-1, 4), 0.0, [w, h, w, h])
        labels = np.asarray(labels, np.int64).reshape(-1)
        x1, y1, x2, y2 = boxes.T
        cxcywh = np.stack([(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h], 1).astype(np.float32)
        # a box squeezed to nothing by rounding is dropped here (boxes cut away by a crop never reach this point)
        ok = np.isfinite(cxcywh).all(1) & (cxcywh[:, 2] > 0) & (cxcywh[:, 3] > 0)
        if not ok.all():
            self.report.add("dropped_by_transform", self.image_info(index)["file_name"], int((~ok).sum()))
            cxcywh, labels = cxcywh[ok], labels[ok]
        target = {
            "labels": torch.from_numpy(labels.copy()),
            "boxes": torch.from_numpy(cxcywh),
            "image_id": int(self.image_info(index)["id"]),
            "orig_size": torch.tensor([orig_h, orig_w], dtype=torch.int64),
            "size": torch.tensor([h, w], dtype=torch.int64),
        }
        return tensor, target

    def coco_gt(self) -> COCO:
        """Ground truth as a :class:`pycocotools.coco.COCO` (original pixels, original category ids), in memory."""
        images, anns = [], []
        for i in range(len(self)):
            info = self.image_info(i)
            images.append({k: info[k] for k in ("id", "file_name", "width", "height")})
            boxes, labels, ign_boxes, ign_labels = self.annotations(i)
            for crowd, bb, ll in ((0, boxes, labels), (1, ign_boxes, ign_labels)):
                for box, label in zip(bb.tolist(), ll.tolist()):
                    w, h = box[2] - box[0], box[3] - box[1]
                    anns.append(
                        {"id": len(anns) + 1, "image_id": info["id"], "category_id": self.cat_ids[label],
                         "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": crowd}
                    )
        return make_coco(images, anns, self.categories())

    def categories(self) -> list[dict[str, Any]]:
        return [{"id": c, "name": n} for c, n in zip(self.cat_ids, self.classes) if n != "N/A"]


def make_coco(images: list[dict], annotations: list[dict], categories: list[dict]) -> COCO:
    """A :class:`pycocotools.coco.COCO` from in-memory lists, without its prints."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class RecordDataset(DetectionDataset):
    """A data set of image files described by :class:`Record` objects (COCO, YOLO, VOC)."""

    def __init__(
        self, name: str, records: list[Record], label_map: LabelMap, transforms: Transform | None, report: DataReport
    ) -> None:
        super().__init__(name, label_map, transforms, report)
        self.records = records
        report.log_summary()

    def __len__(self) -> int:
        return len(self.records)

    def image_info(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        return {"id": r.image_id, "file_name": r.file_name, "width": r.width, "height": r.height, "path": str(r.path)}

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        r = self.records[index]
        return r.boxes, r.labels, r.ignore_boxes, r.ignore_labels

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rec = self.records[index]
        try:
            image, notes = read_rgb(rec.path)
        except FileNotFoundError as e:
            self._lost(rec, "missing_image", f"image file is missing: {rec.path} ({e.strerror}); using another sample")
            raise UnreadableImage(str(rec.path)) from e
        except IMAGE_ERRORS as e:
            self._lost(rec, "unreadable_image", f"cannot read image {rec.path}: {e}; using another sample")
            raise UnreadableImage(str(rec.path)) from e
        for note in notes:
            self.report.add_once(note, rec.file_name)
        boxes, labels = rec.boxes, rec.labels
        h, w = image.shape[:2]
        if (w, h) != (rec.width, rec.height):
            boxes = np.clip(boxes, 0, np.array([w, h, w, h], np.float32))
            ok = (boxes[:, 2] - boxes[:, 0] >= MIN_BOX_SIDE) & (boxes[:, 3] - boxes[:, 1] >= MIN_BOX_SIDE)
            self.report.add_once(
                "size_mismatch", rec.file_name,
                warn=f"{rec.file_name}: image is {w}x{h} but the annotations say {rec.width}x{rec.height}; "
                "boxes are clipped to the image",
                also={"box_outside_image": int((~ok).sum())}, unkept_labels=labels[~ok].tolist(),
            )
            boxes, labels = boxes[ok], labels[ok]
        return image, boxes, labels

    def check_image(self, index: int, decode: bool = False) -> bool:
        """Inspect one image the way :meth:`read` would and count its problems; ``decode=False`` reads the header only.

        Returns whether the image is usable.
        """
        if decode:
            try:
                self.read(index)
            except UnreadableImage:
                return False
            return True
        rec = self.records[index]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(rec.path) as img:
                    mode, orientation = img.mode, _exif_orientation(img)
                    w, h = img.size
        except FileNotFoundError:
            self._lost(rec, "missing_image", f"image file is missing: {rec.path}")
            return False
        except IMAGE_ERRORS as e:
            self._lost(rec, "unreadable_image", f"cannot read image {rec.path}: {e}")
            return False
        if orientation != 1:
            self.report.add_once("exif_rotated", rec.file_name)
            if orientation in (5, 6, 7, 8):
                w, h = h, w
        if mode != "RGB":
            self.report.add_once("converted_to_rgb", rec.file_name)
        if (w, h) != (rec.width, rec.height):
            self.report.add_once("size_mismatch", rec.file_name)
        return True

    def _lost(self, rec: Record, kind: str, message: str) -> None:
        self.report.add_once(kind, rec.file_name, warn=message, also={"boxes_of_dropped_images": len(rec.labels)},
                             unkept_labels=rec.labels.tolist())


def resolve_path(candidates: Sequence[Path], what: str, looked_for: str | None = None) -> Path:
    """The first existing path of ``candidates``, else a :class:`DataError` naming what was looked for."""
    for c in candidates:
        if c.exists():
            return c
    tried = looked_for or ", ".join(str(c) for c in candidates)
    raise DataError(f"{what} not found; looked for: {tried}")


def split_aliases(split: str) -> list[str]:
    """Common spellings of a split name (``val`` is often ``valid`` or ``validation`` in exports)."""
    aliases = {"val": ["val", "valid", "validation"], "valid": ["valid", "val", "validation"], "test": ["test"]}
    return aliases.get(split, [split])


def as_mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise DataError(f"{what} must be a mapping, got {type(value).__name__}")
    return value
