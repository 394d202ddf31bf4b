"""The :class:`Detector` API: images in, :class:`Prediction` out.

::

    from detkit import Detector
    det = Detector.from_checkpoint("runs/shapes/checkpoint_best.pth", threshold=0.5)
    pred = det.predict("street.jpg")            # a path, a PIL image or an RGB uint8 numpy array
    for box, score, name in zip(pred.boxes, pred.scores, pred.class_names):
        print(name, score, box)                 # box: x1, y1, x2, y2 in pixels of the original image
    preds = det.predict(["a.jpg", "b.jpg"])     # a list in, a list out (batched)

A checkpoint written by the trainer holds everything needed (see :mod:`detkit.loading`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from detkit.errors import DataError
from detkit.loading import LoadedModel, load_for_inference

__all__ = ["IMAGE_SUFFIXES", "Prediction", "Detector", "read_image", "as_rgb_array", "find_images"]

#: file name suffixes taken from a folder (case-insensitive)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file as an upright RGB ``uint8 (H, W, 3)`` array; a :class:`DataError` names a bad file."""
    from detkit.data.datasets.base import IMAGE_ERRORS, read_rgb

    p = Path(path)
    if not p.exists():
        raise DataError(f"image not found: {p}")
    if p.is_dir():
        raise DataError(f"{p} is a folder, not an image")
    try:
        image, _ = read_rgb(p)
    except IMAGE_ERRORS as e:
        raise DataError(f"cannot read {p} as an image ({type(e).__name__}: {e})") from e
    return image


def as_rgb_array(image: Any) -> np.ndarray:
    """A path, PIL image or numpy array (``H x W`` grey, ``H x W x 3`` RGB, ``H x W x 4`` RGBA; ``uint8``, or float
    in [0, 1]) -> RGB ``uint8 (H, W, 3)``. Numpy arrays are taken as RGB: convert OpenCV's BGR first."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    from PIL import Image

    if isinstance(image, Image.Image):
        from detkit.data.datasets.base import to_rgb

        return np.ascontiguousarray(np.asarray(to_rgb(image)[0], dtype=np.uint8))
    if isinstance(image, torch.Tensor):
        raise DataError("pass images as paths, PIL images or numpy arrays (H, W, 3), not tensors")
    if not isinstance(image, np.ndarray):
        raise DataError(f"cannot use a {type(image).__name__} as an image (expected a path, PIL image or numpy array)")
    arr = image
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"a numpy image must have shape (H, W), (H, W, 3) or (H, W, 4); got {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.number):
            raise DataError(f"cannot use a numpy array of dtype {arr.dtype} as an image")
        top = float(np.nanmax(arr)) if arr.size else 0.0
        arr = np.nan_to_num(arr.astype(np.float64) * (255.0 if top <= 1.0 else 1.0))
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def find_images(inputs: Iterable[str | os.PathLike[str]], recursive: bool = False) -> list[Path]:
    """Expand files and folders into image paths (folders: files with an image suffix, sorted).

    Missing paths and folders without images are :class:`DataError`; files named explicitly are kept whatever their
    suffix (a non-image fails when it is read, with its name).
    """
    found: list[Path] = []
    for item in inputs:
        p = Path(os.path.expanduser(str(item)))
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(f for f in p.glob(pattern) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(f"no images in folder {p} (looked for {', '.join(IMAGE_SUFFIXES)}"
                                f"{'' if recursive else '; add --recursive for sub-folders'})")
            found.extend(files)
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(f"no such image or folder: {p}")
    if not found:
        raise DataError("no images given")
    return found


@dataclass
class Prediction:
    """Detections of one image, best first: ``boxes (K, 4)`` absolute ``x1, y1, x2, y2`` in original pixels,
    ``scores (K,)``, ``labels (K,)`` (class indices) and ``class_names`` (K names); ``image_size`` is ``(h, w)``."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(len(self.scores))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"height", "width", "detections": [{"box", "score", "label", "class_name"}, ...]}``."""
        dets = [{"box": [round(float(v), 2) for v in b], "score": round(float(s), 5), "label": int(lab),
                 "class_name": name}
                for b, s, lab, name in zip(self.boxes.tolist(), self.scores.tolist(), self.labels.tolist(),
                                           self.class_names)]
        return {"height": int(self.image_size[0]), "width": int(self.image_size[1]), "detections": dets}

    def to_coco(self, image_id: int, cat_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """COCO results format (``bbox`` as ``x, y, w, h``); ``cat_ids[label]`` is the category id (default: label)."""
        out = []
        for b, s, lab in zip(self.boxes.tolist(), self.scores.tolist(), self.labels.tolist()):
            cat = int(cat_ids[lab]) if cat_ids is not None else int(lab)
            out.append({"image_id": int(image_id), "category_id": cat,
                        "bbox": [round(b[0], 2), round(b[1], 2), round(max(b[2] - b[0], 0.0), 2),
                                 round(max(b[3] - b[1], 0.0), 2)], "score": round(float(s), 5)})
        return out


class Detector:
    """A detector ready for images: preprocessing, batching, the model and post-processing.

    :param model: a detkit detector (``forward(images, mask)`` and ``postprocessor``), in eval mode.
    :param classes: class names by label index.
    :param val_transforms: the ``TRANSFORMS`` node used at evaluation (resize; normalisation is always applied).
    :param threshold: detections scoring below are dropped (``predict(..., threshold=...)`` overrides it).
    :param batch_size: images (or tiles) per forward pass.
    :param tile: tiled prediction (:mod:`detkit.tiling`): a tile side in pixels, ``0`` / None (never), or ``"auto"``
        (only images much larger than the model's input, in tiles of the input's side).
    :param overlap: overlap of neighbouring tiles, as a fraction of the tile side.
    :param whole_image: with tiles, also predict the whole image (large objects) and merge it in.
    """

    def __init__(self, model: nn.Module, classes: Sequence[str], val_transforms: Mapping[str, Any] | None = None,
                 threshold: float = 0.5, batch_size: int = 4, device: str | torch.device | None = None,
                 tile: int | str | None = "auto", overlap: float | None = None, whole_image: bool = False) -> None:
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(iter(model.parameters())).device
        self.model.to(self.device)
        self._configure(classes, val_transforms, threshold, batch_size, tile, overlap, whole_image)
        self.loaded: LoadedModel | None = None

    def _configure(self, classes: Sequence[str], val_transforms: Mapping[str, Any] | None, threshold: float,
                   batch_size: int, tile: int | str | None, overlap: float | None, whole_image: bool) -> None:
        """What every runtime shares: classes, preprocessing, threshold, batching and tiling."""
        from detkit.data.transforms import build_transforms
        from detkit.tiling import DEFAULT_OVERLAP, model_input_side

        self.classes = [str(c) for c in classes]
        self.threshold = float(threshold)
        self.batch_size = max(1, int(batch_size))
        self.val_transforms = dict(val_transforms) if val_transforms else None
        self.transform = build_transforms(self.val_transforms)
        self.input_side = model_input_side(self.val_transforms)
        self.tile = tile
        self.overlap = DEFAULT_OVERLAP if overlap is None else float(overlap)
        self.whole_image = bool(whole_image)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], device: str | torch.device = "auto",
                        threshold: float = 0.5, batch_size: int = 4, weights: str = "auto",
                        plugin_imports: Sequence[str] = (), tile: int | str | None = "auto",
                        overlap: float | None = None, whole_image: bool = False) -> Detector:
        """Rebuild the model, classes and preprocessing recorded in a detkit checkpoint.

        ``device``: ``auto`` (a GPU when one is usable, else the CPU, as in training), ``cpu``, ``cuda``, ``cuda:N``.
        ``plugin_imports``: local plugin modules the checkpoint needs and you trust (see :func:`load_for_inference`).
        """
        loaded = load_for_inference(path, device=device, weights=weights, plugin_imports=plugin_imports)
        det = cls(loaded.model, loaded.classes, loaded.val_transforms, threshold=threshold, batch_size=batch_size,
                  device=next(iter(loaded.model.parameters())).device, tile=tile, overlap=overlap,
                  whole_image=whole_image)
        det.loaded = loaded
        return det

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """RGB ``uint8 (H, W, 3)`` -> normalised ``(3, H', W')`` with the evaluation transform."""
        from detkit.data.datasets.base import normalize_image

        if self.transform is None:
            return normalize_image(image)
        tensor, _, _ = self.transform(image, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
        return tensor

    @torch.no_grad()
    def predict(self, images: Any, threshold: float | None = None, tile: int | str | None = None,
                overlap: float | None = None, whole_image: bool | None = None) -> Prediction | list[Prediction]:
        """Detect objects in one image (-> :class:`Prediction`) or a list of images (-> list, in order).

        An image is a path, a PIL image or an RGB numpy array; boxes come back in its own pixels. ``tile``,
        ``overlap`` and ``whole_image`` override the detector's tiling options for this call."""
        from detkit.tiling import resolve_tile

        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        thr = self.threshold if threshold is None else float(threshold)
        tile = self.tile if tile is None else tile
        out: list[Prediction] = []
        for start in range(0, len(items), self.batch_size):
            arrays = [as_rgb_array(im) for im in items[start:start + self.batch_size]]
            tiles = [resolve_tile(tile, a.shape[:2], self.input_side) for a in arrays]
            whole = iter(self._predict_arrays([a for a, t in zip(arrays, tiles) if not t], thr))
            for arr, size in zip(arrays, tiles):
                out.append(self._predict_tiled(arr, size, self.overlap if overlap is None else overlap,
                                               self.whole_image if whole_image is None else whole_image, thr)
                           if size else next(whole))
        return out[0] if single else out

    def _predict_tiled(self, image: np.ndarray, tile: int, overlap: float, whole_image: bool,
                       threshold: float) -> Prediction:
        from detkit.tiling import predict_tiled

        def detect(crops: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
            return [(b[s >= threshold], s[s >= threshold], lab[s >= threshold]) for b, s, lab in self._detect(crops)]

        boxes, scores, labels = predict_tiled(detect, image, tile, overlap, self.batch_size, whole_image)
        return self._prediction(image, boxes, scores, labels, threshold)

    def _detect(self, arrays: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The model and its post-processing on a batch: per array ``(boxes (K, 4) xyxy in its pixels, scores (K,),
        labels (K,))``, all K of the post-processor, unsorted."""
        from detkit.data.collate import collate

        if not arrays:
            return []
        tensors = [self.preprocess(a) for a in arrays]
        images, mask, _ = collate([(t, {}) for t in tensors])
        sizes = torch.tensor([a.shape[:2] for a in arrays], dtype=torch.int64)
        outputs = self.model(images.to(self.device), mask.to(self.device))
        outputs = {k: v.float() for k, v in outputs.items() if isinstance(v, torch.Tensor)}
        results = self.model.postprocessor(outputs, sizes.to(self.device))  # boxes clipped to each image
        return [(r["boxes"].float().cpu().numpy(), r["scores"].float().cpu().numpy(),
                 r["labels"].cpu().to(torch.int64).numpy()) for r in results]

    def _prediction(self, arr: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    threshold: float) -> Prediction:
        """Detections of one image scoring at least ``threshold``, best first."""
        keep = np.asarray(scores) >= threshold
        scores, boxes, labels = np.asarray(scores)[keep], np.asarray(boxes).reshape(-1, 4)[keep], labels[keep]
        order = np.argsort(-scores, kind="stable")
        labels = np.asarray(labels, np.int64)[order]
        names = [self.classes[i] if 0 <= i < len(self.classes) else str(i) for i in labels.tolist()]
        return Prediction(boxes[order].astype(np.float32), scores[order].astype(np.float32), labels, names,
                          (int(arr.shape[0]), int(arr.shape[1])))

    def _predict_arrays(self, arrays: list[np.ndarray], threshold: float) -> list[Prediction]:
        return [self._prediction(a, *res, threshold) for a, res in zip(arrays, self._detect(arrays))]

    __call__ = predict
