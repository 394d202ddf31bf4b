"""Inference on images: the :class:`Detector` API and ``detkit predict``.

::

    from detkit import Detector
    det = Detector.from_checkpoint("runs/shapes/checkpoint_best.pth", threshold=0.5)
    pred = det.predict("street.jpg")            # a path, a PIL image or an RGB uint8 numpy array
    for box, score, name in zip(pred.boxes, pred.scores, pred.class_names):
        print(name, score, box)                 # box: x1, y1, x2, y2 in pixels of the original image
    preds = det.predict(["a.jpg", "b.jpg"])     # a list in, a list out (batched)

A checkpoint written by the trainer holds everything needed: ``config`` (the resolved config: the model is rebuilt
from ``config["model"]`` and images are prepared with ``config["data"]["val_transforms"]``, as at evaluation),
``classes`` and the weights (``ema`` when present, else ``model``).

:func:`load_for_inference` is the shared loader of the eval, predict, export and bench tools.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from detkit.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger("detkit.predict")

#: file name suffixes taken from a folder (case-insensitive)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
WEIGHTS_CHOICES = ("auto", "ema", "model")


# ---------------------------------------------------------------------------------------------------------------------
# Loading a checkpoint for inference (shared by eval / predict / export / bench)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A detector rebuilt from a checkpoint, in eval mode, with what is needed to feed it."""

    model: nn.Module
    config: dict[str, Any]  # resolved config as plain containers (the checkpoint's, or the one given)
    classes: list[str]
    weights: str  # "ema" or "model": which entry of the checkpoint was loaded
    path: Path
    checkpoint: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def val_transforms(self) -> Mapping[str, Any] | None:
        return (self.config.get("data") or {}).get("val_transforms", _default_val_transforms())


def _default_val_transforms() -> Any:
    from detkit.config import DataConfig

    return DataConfig().val_transforms


def _model_type(cfg: Mapping[str, Any] | None) -> str | None:
    model = (cfg or {}).get("model") if isinstance(cfg, Mapping) else None
    return model.get("type") if isinstance(model, Mapping) else None


def _pick_state(ckpt: Mapping[str, Any], weights: str, path: Path) -> tuple[str, Mapping[str, torch.Tensor]]:
    if weights not in WEIGHTS_CHOICES:
        raise ConfigError(f"weights must be one of {', '.join(WEIGHTS_CHOICES)}, got {weights!r}")
    ema = ckpt.get("ema")
    has_ema = isinstance(ema, Mapping) and bool(ema)
    if weights == "ema" and not has_ema:
        raise CheckpointError(f"{path} has no EMA weights (it was trained with train.ema=false); use --weights model")
    key = "ema" if (weights == "ema" or (weights == "auto" and has_ema)) else "model"
    state = ckpt.get(key)
    if key == "ema" and isinstance(state, Mapping) and "module" in state:
        state = state["module"]
    if not isinstance(state, Mapping) or not state:
        entries = ", ".join(map(str, ckpt)) or "none"
        raise CheckpointError(f"{path} has no {key!r} weights (entries: {entries}); is it a detkit checkpoint? "
                              "Official checkpoints need `detkit convert` first")
    return key, state


def load_for_inference(checkpoint: str | os.PathLike[str], config: str | os.PathLike[str] | None = None,
                       overrides: Sequence[str] = (), device: str | torch.device = "auto",
                       weights: str = "auto", plugin_imports: Sequence[str] = (), optimize: bool = True
                       ) -> LoadedModel:
    """Rebuild the detector of ``checkpoint`` and load its weights (eval mode, on ``device``).

    :param device: ``auto`` (a GPU when one is usable, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or a
        ``torch.device``; resolved by :func:`detkit.engine.device.resolve_device`, as in training.

    :param config: a config file to build the model from instead of the checkpoint's own config (``detkit eval``);
        it must describe the same architecture: another model type, or weights that do not fit, raise a
        :class:`~detkit.errors.CheckpointError` that says so.
    :param overrides: dotted overrides applied to ``config`` (only with ``config``).
    :param weights: ``auto`` (EMA weights when the checkpoint has them, else the raw model), ``ema`` or ``model``.
    :param plugin_imports: local plugin modules you trust to import. A checkpoint is untrusted input, so the
        ``plugins.imports`` recorded in its own config are never imported unless named here (or already imported).
    :param optimize: apply :func:`detkit.models.fuse.optimize_for_inference` (batch norms folded into their
        convolutions, channels-last weights): same outputs up to float rounding, faster; the model's state dict then
        no longer has the training layout, so pass ``False`` to get a model to fine-tune or save.
    """
    from detkit import plugins
    from detkit.config import compose, to_container
    from detkit.engine.checkpoint import load_checkpoint_file, load_state_dict
    from detkit.engine.device import resolve_device
    from detkit.models.build import build_model

    target = resolve_device(device)  # a bad device fails before the checkpoint is read
    path = Path(os.path.expanduser(str(checkpoint)))
    ckpt = load_checkpoint_file(path)
    saved_cfg = ckpt.get("config")
    classes = [str(c) for c in ckpt.get("classes") or []]
    if config is not None:
        cfg = to_container(compose(config, list(overrides)))
        saved_type, new_type = _model_type(saved_cfg), _model_type(cfg)
        if saved_type and new_type and saved_type != new_type:
            raise CheckpointError(f"wrong config for the checkpoint: {path} holds a {saved_type!r} model but "
                                  f"{config} builds {new_type!r}")
    else:
        if overrides:
            raise ConfigError("overrides need a config file")
        if not isinstance(saved_cfg, Mapping) or not isinstance(saved_cfg.get("model"), Mapping):
            raise CheckpointError(f"{path} has no saved config to rebuild the model from (entries: "
                                  f"{', '.join(map(str, ckpt))}); pass the config file it was trained with")
        cfg = json.loads(json.dumps(saved_cfg))  # a private plain copy
    model_cfg = dict(cfg.get("model") or {})
    if model_cfg.get("num_classes", "absent") is None:
        saved_n = ((saved_cfg or {}).get("model") or {}).get("num_classes") if isinstance(saved_cfg, Mapping) else None
        if saved_n is None and not classes:
            raise CheckpointError(f"model.num_classes is null and {path} records no classes; set model.num_classes")
        model_cfg["num_classes"] = int(saved_n if saved_n is not None else len(classes))
        cfg["model"] = model_cfg
    plugin_cfg = cfg.get("plugins") or {}
    imports = list(plugin_cfg.get("imports") or [])
    if config is None:  # the config came from the checkpoint: it may not make detkit import code
        untrusted = [m for m in imports if m not in plugin_imports and m not in sys.modules]
        if untrusted:
            raise CheckpointError(
                f"{path} was trained with local plugin modules {untrusted} (plugins.imports in its saved config); "
                "detkit never imports code named inside a checkpoint. If you trust them, pass "
                + " ".join(f"--plugin-import {m}" for m in untrusted)
                + " (Python: plugin_imports=[...]), or pass the config file you trained with")
    plugins.configure(plugin_cfg.get("disable") or [], [*imports, *plugin_imports])
    key, state = _pick_state(ckpt, weights, path)
    model = build_model(model_cfg)
    try:
        load_state_dict(model, state, strict=True, source=f"{path} ({key})")
    except CheckpointError as e:
        if config is not None:
            e.add_note(f"wrong config for the checkpoint? {config} builds a model whose parameters differ from "
                       f"{path}'s (e.g. another size preset, hidden_dim or num_classes)")
        raise
    if not classes:
        n = int(getattr(model, "num_classes", 0))
        classes = [f"class_{i}" for i in range(n)]
    model.eval().to(target)
    if optimize:
        from detkit.models.fuse import optimize_for_inference

        optimize_for_inference(model)
    return LoadedModel(model=model, config=cfg, classes=classes, weights=key, path=path, checkpoint=ckpt)


# ---------------------------------------------------------------------------------------------------------------------
# Images in
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# The Detector API
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------------------


def class_colour(label: int) -> tuple[int, int, int]:
    """A distinct, saturated colour per class (golden-ratio hues)."""
    import colorsys

    h = (label * 0.618033988749895 + 0.08) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_predictions(image: np.ndarray, pred: Prediction) -> Any:
    """The image with each box, class name and score drawn on it (a PIL image)."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    h, w = image.shape[:2]
    line = max(1, round(min(h, w) / 200))
    font_size = max(10, round(min(h, w) / 32))
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    # lowest score first, so the best boxes are drawn on top
    for i in reversed(range(len(pred))):
        x1, y1, x2, y2 = (float(v) for v in pred.boxes[i])
        colour = class_colour(int(pred.labels[i]))
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line)
        text = f"{pred.class_names[i]} {float(pred.scores[i]):.2f}"
        tx1, ty1, tx2, ty2 = draw.textbbox((0, 0), text, font=font)
        tw, th = tx2 - tx1, ty2 - ty1
        top = y1 - th - 2 * line if y1 - th - 2 * line >= 0 else y1
        left = min(max(x1, 0), max(w - tw - 2 * line, 0))
        draw.rectangle([left, top, left + tw + 2 * line, top + th + 2 * line], fill=colour)
        draw.text((left + line - tx1, top + line - ty1), text, fill=(0, 0, 0) if sum(colour) > 450 else (255, 255, 255),
                  font=font)
    return canvas


# ---------------------------------------------------------------------------------------------------------------------
# detkit predict
# ---------------------------------------------------------------------------------------------------------------------


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        stem = p.stem or "image"
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        stems.append(stem if n == 0 else f"{stem}_{n}")
    return stems


def default_cat_ids(loaded: LoadedModel) -> list[int]:
    """Category ids for COCO results: the checkpoint's ``cat_ids`` when recorded, label = id for the
    ``coco_official`` label map, else ``label + 1`` (COCO ids start at 1)."""
    saved = loaded.checkpoint.get("cat_ids")
    if isinstance(saved, (list, tuple)) and len(saved) == len(loaded.classes):
        return [int(c) for c in saved]
    if (loaded.config.get("data") or {}).get("label_map") == "coco_official":
        return list(range(len(loaded.classes)))
    return [i + 1 for i in range(len(loaded.classes))]


def predict_main(argv: list[str]) -> int:
    """``detkit predict --checkpoint CKPT IMAGE_OR_DIR ... --out DIR [--threshold 0.5]``."""
    parser = argparse.ArgumentParser(
        prog="detkit predict",
        description="Run a checkpoint on images: writes annotated images, one JSON per image and COCO results.")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    parser.add_argument("--checkpoint", required=True,
                        help="a detkit checkpoint (checkpoint_best.pth, ...), or an exported .onnx file with "
                             "--runtime onnxruntime")
    parser.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                        help="torch (a checkpoint) or onnxruntime (a file written by detkit export)")
    parser.add_argument("--tile", default="auto", metavar="SIZE",
                        help="predict in overlapping SIZE x SIZE tiles, merged across the seams; auto (default): "
                             "only images over 2x the model's input side, in tiles of that side; 0: never")
    parser.add_argument("--overlap", type=float, default=0.2, help="tile overlap, a fraction of SIZE (default 0.2)")
    parser.add_argument("--whole-image", action="store_true", help="with tiles, also predict the whole image")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--threshold", type=float, default=0.5, help="minimum score to keep (default 0.5)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--weights", choices=WEIGHTS_CHOICES, default="auto",
                        help="EMA or raw weights (auto: EMA when the checkpoint has them)")
    parser.add_argument("--recursive", action="store_true", help="also take images in sub-folders")
    parser.add_argument("--no-draw", action="store_true", help="only write JSON")
    parser.add_argument("--plugin-import", action="append", default=[], metavar="MODULE",
                        help="a local plugin module the checkpoint needs and you trust (repeatable)")
    parser.add_argument("--no-tf32", action="store_true", help="CUDA: full fp32 matmuls/convolutions (default TF32)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0 or math.isnan(args.threshold):
        raise ConfigError(f"--threshold must be within [0, 1], got {args.threshold}")
    from detkit.engine.precision import configure_tf32
    from detkit.tiling import check_tile_options, parse_tile, resolve_tile

    configure_tf32(not args.no_tf32)
    tile = parse_tile(args.tile)
    check_tile_options(64, args.overlap)
    paths = find_images(args.inputs, recursive=args.recursive)
    tiling = {"tile": tile, "overlap": args.overlap, "whole_image": args.whole_image}
    det: Detector
    if args.runtime == "onnxruntime":
        from detkit.export.runtime import OnnxDetector

        det = OnnxDetector(args.checkpoint, threshold=args.threshold, batch_size=args.batch_size, **tiling)
        cat_ids = list(det.cat_ids)
    else:
        if str(args.checkpoint).endswith(".onnx"):
            raise ConfigError(f"{args.checkpoint} is an ONNX file: add --runtime onnxruntime")
        det = Detector.from_checkpoint(args.checkpoint, device=args.device, threshold=args.threshold,
                                       batch_size=args.batch_size, weights=args.weights,
                                       plugin_imports=args.plugin_import, **tiling)
        assert det.loaded is not None
        cat_ids = default_cat_ids(det.loaded)
    out = Path(os.path.expanduser(args.out))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the folder: {e.strerror or e}") from e
    stems = _unique_stems(paths)
    coco_images, coco_results, total = [], [], 0
    for start in range(0, len(paths), det.batch_size):
        chunk = list(range(start, min(start + det.batch_size, len(paths))))
        arrays = [read_image(paths[i]) for i in chunk]
        preds = det.predict(arrays)
        for i, arr, pred in zip(chunk, arrays, preds):
            image_id = i + 1
            record = {"image": str(paths[i]), "image_id": image_id, **pred.as_dict()}
            (out / f"{stems[i]}.json").write_text(json.dumps(record, indent=1))
            if not args.no_draw:
                suffix = ".png" if paths[i].suffix.lower() == ".png" else ".jpg"
                draw_predictions(arr, pred).save(out / f"{stems[i]}{suffix}", quality=92)
            coco_images.append({"id": image_id, "file_name": str(paths[i]), "height": int(arr.shape[0]),
                                "width": int(arr.shape[1])})
            coco_results.extend(pred.to_coco(image_id, cat_ids))
            total += len(pred)
            size = resolve_tile(det.tile, arr.shape[:2], det.input_side)
            print(f"{paths[i]}: {len(pred)} detections" + (f" in {size} px tiles" if size else "") + (
                " (" + ", ".join(f"{n} {s:.2f}" for n, s in zip(pred.class_names[:5], pred.scores[:5].tolist()))
                + (", ..." if len(pred) > 5 else "") + ")" if len(pred) else ""))
    categories = [{"id": c, "name": n} for c, n in zip(cat_ids, det.classes) if n != "N/A"]
    (out / "coco_results.json").write_text(json.dumps(coco_results))
    (out / "coco_images.json").write_text(json.dumps({"images": coco_images, "categories": categories}))
    print(f"{len(paths)} images, {total} detections (score >= {args.threshold}) -> {out}")
    return 0

