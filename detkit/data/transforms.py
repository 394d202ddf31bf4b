"""Augmentation pipelines: albumentations transforms declared in YAML through the ``TRANSFORMS`` registry.

A pipeline node is built by :func:`build_transforms` into a :class:`DetectionTransform`, which runs an
``albumentations.Compose`` with ``bbox_params`` (boxes stay aligned through every step; sizes are sampled per
image) and then normalises with the ImageNet mean and std (always last, exactly once)::

    train_transforms: {type: lwdetr_train, sizes: [256, 320]}          # a preset, sizes configurable
    train_transforms:                                                   # or a custom list
      type: compose
      transforms:
        - {type: horizontal_flip, p: 0.5}
        - {type: albumentations, name: ColorJitter, brightness: 0.2, p: 0.5}
        - type: one_of
          transforms: [{type: square_resize, sizes: [320]}, {type: random_size_crop, min_size: 200, max_size: 300}]

``{type: albumentations, name: X, ...}`` builds albumentations' public transform class ``X`` (keyword arguments
passed on). Only names of albumentations transform classes that keep boxes consistent are accepted (pixel-level
transforms, or spatial ones that support bounding boxes); never import paths. ``Normalize``/``ToTensorV2`` are
refused because the pipeline normalises itself.

The presets follow the official recipes (see the reference sheet): ``detr_train`` / ``detr_val`` (shorter side
480..800 step 32, max 1333, or with probability 0.5 resize [400, 500, 600] + random size crop 384..600 + multi-scale
resize; val shorter side 800) and ``lwdetr_train`` / ``lwdetr_val`` (square resize to 448..896 step 64, same crop
branch; val square 640).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI on import otherwise

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from albumentations.augmentations.crops.transforms import BaseCrop  # noqa: E402
from albumentations.core.type_definitions import Targets  # noqa: E402

from detkit.data.datasets.base import normalize_image  # noqa: E402
from detkit.errors import ConfigError  # noqa: E402
from detkit.registry import TRANSFORMS, did_you_mean  # noqa: E402

DETR_SCALES = list(range(480, 801, 32))
LWDETR_SIZES = list(range(448, 897, 64))
CROP_RESIZE_SIZES = [400, 500, 600]


# ---------------------------------------------------------------------------------------------------------------------
# The transforms the official recipes need and albumentations does not have
# ---------------------------------------------------------------------------------------------------------------------


def shorter_side_size(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output ``(h, w)`` when the shorter side becomes ``size`` and the longer side stays <= ``max_size``.

    If the longer side would exceed ``max_size``, the shorter side is reduced to ``round(max_size * short / long)``;
    the longer side is ``int(size * long / short)`` (the official DETR rule).
    """
    short, long = min(height, width), max(height, width)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if short == size:
        return height, width
    other = max(1, int(size * long / short))
    size = max(1, size)
    return (size, other) if height <= width else (other, size)


class ShorterSideResize(A.DualTransform):
    """Resize so the shorter side is a size drawn from ``sizes`` (per image), the longer side at most ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None, interpolation: int = cv2.INTER_LINEAR,
                 p: float = 1.0) -> None:
        super().__init__(p=p)
        self.sizes, self.max_size, self.interpolation = list(sizes), max_size, interpolation

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        return {"out_shape": shorter_side_size(h, w, self.py_random.choice(self.sizes), self.max_size)}

    def apply(self, img: np.ndarray, out_shape: tuple[int, int], **params: Any) -> np.ndarray:
        if img.shape[:2] == tuple(out_shape):
            return img
        return cv2.resize(img, (out_shape[1], out_shape[0]), interpolation=self.interpolation)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes  # albumentations keeps boxes normalised internally: a resize does not move them

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sizes", "max_size", "interpolation")


class SquareResize(A.DualTransform):
    """Resize to ``s x s`` (aspect ratio not kept) with ``s`` drawn from ``sizes`` per image (LW-DETR)."""

    def __init__(self, sizes: Sequence[int], interpolation: int = cv2.INTER_LINEAR, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.sizes, self.interpolation = list(sizes), interpolation

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        s = self.py_random.choice(self.sizes)
        return {"out_shape": (s, s)}

    def apply(self, img: np.ndarray, out_shape: tuple[int, int], **params: Any) -> np.ndarray:
        if img.shape[:2] == tuple(out_shape):
            return img
        return cv2.resize(img, (out_shape[1], out_shape[0]), interpolation=self.interpolation)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sizes", "interpolation")


class RandomSizeCrop(BaseCrop):
    """Crop a random ``h x w`` region, each side drawn uniformly from ``[min_size, min(side, max_size)]`` (DETR)."""

    def __init__(self, min_size: int, max_size: int, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.min_size, self.max_size = min_size, max_size

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        hi_w, hi_h = min(width, self.max_size), min(height, self.max_size)
        w = self.py_random.randint(min(self.min_size, hi_w), hi_w)
        h = self.py_random.randint(min(self.min_size, hi_h), hi_h)
        x = self.py_random.randint(0, width - w)
        y = self.py_random.randint(0, height - h)
        return {"crop_coords": (x, y, x + w, y + h)}

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_size", "max_size")


# ---------------------------------------------------------------------------------------------------------------------
# Registered building blocks
# ---------------------------------------------------------------------------------------------------------------------


def _build_list(transforms: Sequence[Mapping[str, Any]], what: str) -> list[Any]:
    if not isinstance(transforms, (list, tuple)) or not transforms:
        raise ConfigError(f"{what}: 'transforms' must be a non-empty list of transform nodes, got {transforms!r}")
    return [TRANSFORMS.build(t) for t in transforms]


@TRANSFORMS.register("compose")
def compose(transforms: list[dict[str, Any]], p: float = 1.0) -> A.Sequential:
    """Apply ``transforms`` in order (with probability ``p``)."""
    return A.Sequential(_build_list(transforms, "compose"), p=p)


@TRANSFORMS.register("one_of")
def one_of(transforms: list[dict[str, Any]], p: float = 1.0) -> A.OneOf:
    """Apply one of ``transforms``, chosen with probability proportional to each one's ``p``."""
    return A.OneOf(_build_list(transforms, "one_of"), p=p)


@TRANSFORMS.register("horizontal_flip")
def horizontal_flip(p: float = 0.5) -> A.HorizontalFlip:
    return A.HorizontalFlip(p=p)


@TRANSFORMS.register("random_resize")
def random_resize(sizes: list[int], max_size: int | None = None, p: float = 1.0) -> ShorterSideResize:
    """DETR resize: shorter side drawn from ``sizes``, longer side at most ``max_size``."""
    _check_sizes(sizes, "random_resize")
    return ShorterSideResize(sizes, max_size, p=p)


@TRANSFORMS.register("square_resize")
def square_resize(sizes: list[int], p: float = 1.0) -> SquareResize:
    """LW-DETR resize to a square ``s x s``, ``s`` drawn from ``sizes``."""
    _check_sizes(sizes, "square_resize")
    return SquareResize(sizes, p=p)


@TRANSFORMS.register("random_size_crop")
def random_size_crop(min_size: int, max_size: int, p: float = 1.0) -> RandomSizeCrop:
    """DETR random crop with sides drawn from ``[min_size, max_size]`` (clamped to the image)."""
    if not 0 < min_size <= max_size:
        raise ConfigError(f"random_size_crop needs 0 < min_size <= max_size, got {min_size}, {max_size}")
    return RandomSizeCrop(min_size, max_size, p=p)


#: albumentations classes refused by the generic node: the pipeline normalises and tensorises itself; the others need
#: inputs a detection pipeline does not have (masks, reference images, metadata) or are 3-D/base classes
ALBU_DENY = frozenset(
    {"Normalize", "ToTensorV2", "ToFloat", "FromFloat", "Lambda", "Mosaic", "OverlayElements", "TextImage", "FDA",
     "HistogramMatching", "PixelDistributionAdaptation", "MaskDropout", "CropNonEmptyMaskIfExists",
     "RandomCropNearBBox", "BasicTransform", "DualTransform", "ImageOnlyTransform", "Transform3D", "ToRGB"}
)


def albumentations_names() -> list[str]:
    """Names accepted by ``{type: albumentations, name: ...}``."""
    names = []
    for name in dir(A):
        cls = getattr(A, name)
        if name.startswith("_") or name in ALBU_DENY or "3D" in name or not inspect.isclass(cls):
            continue
        if issubclass(cls, A.ImageOnlyTransform) or (
            issubclass(cls, A.DualTransform) and Targets.BBOXES in getattr(cls, "_targets", ())
        ):
            names.append(name)
    return sorted(names)


@TRANSFORMS.register("albumentations")
def albumentations(name: str, **kwargs: Any) -> A.BasicTransform:
    """Any public albumentations transform class that keeps boxes consistent, by class name, e.g.
    ``{type: albumentations, name: RandomBrightnessContrast, brightness_limit: 0.2, p: 0.5}``."""
    allowed = albumentations_names()
    if name not in allowed:
        why = " (the pipeline normalises images itself)" if name in ("Normalize", "ToTensorV2") else ""
        raise ConfigError(
            f"albumentations transform {name!r} is not allowed{why}{did_you_mean(name, allowed)} "
            "(allowed: public albumentations pixel transforms and spatial transforms that support bounding boxes)"
        )
    try:
        return getattr(A, name)(**kwargs, strict=True)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"albumentations {name}: {e}") from e


def _check_sizes(sizes: Any, what: str) -> None:
    if not isinstance(sizes, (list, tuple)) or not sizes or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise ConfigError(f"{what}: sizes must be a non-empty list of positive ints, got {sizes!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Presets (the official recipes, every size configurable)
# ---------------------------------------------------------------------------------------------------------------------


def _crop_branch(crop_resize_sizes: list[int], crop_min_size: int, crop_max_size: int) -> list[Any]:
    return [ShorterSideResize(crop_resize_sizes), random_size_crop(crop_min_size, crop_max_size)]


@TRANSFORMS.register("detr_train")
def detr_train(
    scales: list[int] = DETR_SCALES,  # noqa: B006 - never mutated
    max_size: int = 1333,
    crop_resize_sizes: list[int] = CROP_RESIZE_SIZES,  # noqa: B006
    crop_min_size: int = 384,
    crop_max_size: int = 600,
    crop_prob: float = 0.5,
    flip_prob: float = 0.5,
) -> A.Sequential:
    """DETR training: flip, then multi-scale shorter-side resize, or (``crop_prob``) resize + random crop + resize."""
    _check_sizes(scales, "detr_train scales")
    _check_sizes(crop_resize_sizes, "detr_train crop_resize_sizes")
    plain = ShorterSideResize(scales, max_size, p=1.0 - crop_prob)
    cropped = A.Sequential([*_crop_branch(crop_resize_sizes, crop_min_size, crop_max_size),
                            ShorterSideResize(scales, max_size)], p=crop_prob)
    return A.Sequential([A.HorizontalFlip(p=flip_prob), A.OneOf([plain, cropped], p=1.0)], p=1.0)


@TRANSFORMS.register("detr_val")
def detr_val(size: int = 800, max_size: int = 1333) -> ShorterSideResize:
    """DETR evaluation: shorter side ``size``, longer side at most ``max_size``."""
    return ShorterSideResize([size], max_size)


@TRANSFORMS.register("lwdetr_train")
def lwdetr_train(
    sizes: list[int] = LWDETR_SIZES,  # noqa: B006
    crop_resize_sizes: list[int] = CROP_RESIZE_SIZES,  # noqa: B006
    crop_min_size: int = 384,
    crop_max_size: int = 600,
    crop_prob: float = 0.5,
    flip_prob: float = 0.5,
) -> A.Sequential:
    """LW-DETR training: flip, then square multi-scale resize, or (``crop_prob``) resize + crop + square resize.

    The ViT needs sides divisible by 64 (``sizes`` should be multiples of 64)."""
    _check_sizes(sizes, "lwdetr_train sizes")
    _check_sizes(crop_resize_sizes, "lwdetr_train crop_resize_sizes")
    plain = SquareResize(sizes, p=1.0 - crop_prob)
    cropped = A.Sequential([*_crop_branch(crop_resize_sizes, crop_min_size, crop_max_size), SquareResize(sizes)],
                           p=crop_prob)
    return A.Sequential([A.HorizontalFlip(p=flip_prob), A.OneOf([plain, cropped], p=1.0)], p=1.0)


@TRANSFORMS.register("lwdetr_val")
def lwdetr_val(size: int = 640) -> SquareResize:
    """LW-DETR evaluation: square ``size x size``."""
    return SquareResize([size])


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------------------


class DetectionTransform:
    """``(image uint8 (H, W, 3), boxes (N, 4) xyxy pixels, labels (N,)) -> (tensor (3, H', W'), boxes, labels)``.

    Random state: each process (DataLoader worker) reseeds the albumentations pipeline from ``torch.initial_seed()``
    on its first call, so workers draw different augmentations and a seeded run is reproducible.
    """

    def __init__(self, transforms: Sequence[Any]) -> None:
        self.compose = A.Compose(
            list(transforms),
            bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True,
                                     filter_invalid_bboxes=True),
        )
        self._pid: int | None = None

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self.compose.set_random_seed(torch.initial_seed() % 2**32)
        out = self.compose(image=image, bboxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                           labels=np.asarray(labels, np.int64))
        out_boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        out_labels = np.asarray(out["labels"], np.int64).reshape(-1)
        return normalize_image(out["image"]), out_boxes, out_labels

    def __repr__(self) -> str:
        return f"DetectionTransform({self.compose.transforms!r})"


def build_transforms(node: Mapping[str, Any] | None) -> DetectionTransform | None:
    """Build a pipeline from a ``TRANSFORMS`` node (``None`` or ``{}``: no augmentation, normalisation only)."""
    if node is None or (isinstance(node, Mapping) and not node):
        return None
    return DetectionTransform([TRANSFORMS.build(node)])
