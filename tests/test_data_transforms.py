"""Augmentation pipelines keep boxes aligned with the pixels; presets follow the official size rules; collate pads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detkit.data.collate import collate
from detkit.data.datasets.base import IMAGENET_MEAN, IMAGENET_STD
from detkit.data.transforms import albumentations_names, build_transforms, shorter_side_size
from detkit.errors import ConfigError, RegistryError

SMALL_PRESETS = {
    "detr_train": {"type": "detr_train", "scales": [64, 96, 128], "max_size": 200, "crop_resize_sizes": [80, 100],
                   "crop_min_size": 48, "crop_max_size": 90},
    "detr_val": {"type": "detr_val", "size": 96, "max_size": 160},
    "lwdetr_train": {"type": "lwdetr_train", "sizes": [64, 128], "crop_resize_sizes": [80, 100],
                     "crop_min_size": 48, "crop_max_size": 90},
    "lwdetr_val": {"type": "lwdetr_val", "size": 128},
}


def unnormalize(t: torch.Tensor) -> np.ndarray:
    raw = t * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    return (raw * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def test_shorter_side_rule() -> None:
    assert shorter_side_size(480, 640, 800, 1333) == (800, 1066)
    assert shorter_side_size(640, 480, 800, 1333) == (1066, 800)
    # the longer side would be 3200 > 1333: the shorter side becomes round(1333 * 500 / 2000) = 333
    assert shorter_side_size(500, 2000, 800, 1333) == (333, 1332)
    assert shorter_side_size(800, 1000, 800, 1333) == (800, 1000)
    assert shorter_side_size(100, 300, 64, None) == (64, 192)


def test_horizontal_flip_moves_a_known_box() -> None:
    image = np.zeros((50, 100, 3), np.uint8)
    image[5:25, 10:30] = 255
    tf = build_transforms({"type": "horizontal_flip", "p": 1.0})
    out, boxes, labels = tf(image, np.array([[10, 5, 30, 25]], np.float32), np.array([2]))
    np.testing.assert_allclose(boxes, [[70, 5, 90, 25]])
    assert labels.tolist() == [2]
    ys, xs = np.nonzero(unnormalize(out)[..., 0] > 128)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (70, 90, 5, 25)


def test_square_resize_scales_boxes() -> None:
    tf = build_transforms({"type": "square_resize", "sizes": [64]})
    out, boxes, _ = tf(np.zeros((50, 100, 3), np.uint8), np.array([[10, 5, 30, 25]], np.float32), np.array([0]))
    assert out.shape == (3, 64, 64)
    np.testing.assert_allclose(boxes, [[6.4, 6.4, 19.2, 32.0]], rtol=1e-5)


def _scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Black image with up to 3 non-overlapping solid rectangles in distinct colours; boxes in pixels."""
    image = np.zeros((h, w, 3), np.uint8)
    boxes = []
    cols = w // 3
    for k in range(3):
        bw, bh = rng.integers(8, cols - 2), rng.integers(8, h // 2)
        x1 = k * cols + rng.integers(0, cols - bw)
        y1 = rng.integers(0, h - bh)
        image[y1:y1 + bh, x1:x1 + bw] = [(255, 0, 0), (0, 255, 0), (0, 0, 255)][k]
        boxes.append((x1, y1, x1 + bw, y1 + bh))
    return image, np.array(boxes, np.float32)


@pytest.mark.parametrize("preset", list(SMALL_PRESETS))
def test_presets_keep_boxes_on_their_pixels(preset: str) -> None:
    tf = build_transforms(SMALL_PRESETS[preset])
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    for _ in range(12):
        image, boxes = _scene(rng, 90, 150)
        out, out_boxes, labels = tf(image, boxes, np.arange(3))
        pic = unnormalize(out)
        h, w = pic.shape[:2]
        for box, label in zip(out_boxes, labels):
            assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
            ys, xs = np.nonzero(pic[..., label] > 128)
            # the box must be where that colour is (interpolation blurs edges by about a pixel)
            assert abs(xs.min() - box[0]) <= 1.5 and abs(xs.max() + 1 - box[2]) <= 1.5, (preset, box)
            assert abs(ys.min() - box[1]) <= 1.5 and abs(ys.max() + 1 - box[3]) <= 1.5, (preset, box)
        for label in set(range(3)) - set(labels.tolist()):  # a dropped box must be cropped away entirely
            assert (pic[..., label] > 200).sum() <= 2, preset


def test_val_presets_follow_the_official_sizes() -> None:
    image = np.zeros((480, 640, 3), np.uint8)
    out, _, _ = build_transforms({"type": "detr_val"})(image, np.zeros((0, 4), np.float32), np.zeros(0))
    assert out.shape == (3, 800, 1066)
    out, _, _ = build_transforms({"type": "lwdetr_val"})(image, np.zeros((0, 4), np.float32), np.zeros(0))
    assert out.shape == (3, 640, 640)


def test_multi_scale_sizes_are_sampled_per_image() -> None:
    tf = build_transforms({"type": "lwdetr_train", "sizes": [64, 128, 192], "crop_prob": 0.0})
    image = np.zeros((100, 100, 3), np.uint8)
    sizes = {tf(image, np.zeros((0, 4), np.float32), np.zeros(0))[0].shape[1] for _ in range(30)}
    assert sizes == {64, 128, 192}
    detr = build_transforms({"type": "detr_train", "scales": [64, 96], "max_size": 1000, "crop_prob": 0.0})
    shapes = {tuple(detr(np.zeros((100, 200, 3), np.uint8), np.zeros((0, 4), np.float32), np.zeros(0))[0].shape[1:])
              for _ in range(30)}
    assert shapes == {(64, 128), (96, 192)}


def test_same_torch_seed_same_augmentation() -> None:
    node = SMALL_PRESETS["detr_train"]
    image = np.zeros((90, 150, 3), np.uint8)

    def run(seed: int) -> list[tuple[int, ...]]:
        torch.manual_seed(seed)
        tf = build_transforms(node)
        return [tuple(tf(image, np.zeros((0, 4), np.float32), np.zeros(0))[0].shape) for _ in range(10)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_custom_compose_from_yaml_nodes() -> None:
    node = {"type": "compose", "transforms": [
        {"type": "horizontal_flip", "p": 1.0},
        {"type": "albumentations", "name": "RandomBrightnessContrast", "p": 1.0},
        {"type": "one_of", "transforms": [{"type": "square_resize", "sizes": [32]}]},
    ]}
    out, boxes, _ = build_transforms(node)(np.zeros((40, 80, 3), np.uint8), np.array([[0, 0, 20, 10]], np.float32),
                                           np.array([1]))
    assert out.shape == (3, 32, 32)
    np.testing.assert_allclose(boxes, [[24, 0, 32, 8]], rtol=1e-5)  # flipped to (60, 0, 80, 10), then scaled


def test_generic_albumentations_node_is_safe() -> None:
    assert "HorizontalFlip" in albumentations_names() and "ColorJitter" in albumentations_names()
    assert "Normalize" not in albumentations_names() and "Lambda" not in albumentations_names()
    with pytest.raises(ConfigError, match="normalises images itself"):
        build_transforms({"type": "albumentations", "name": "Normalize"})
    with pytest.raises(ConfigError, match="did you mean 'ColorJitter'"):
        build_transforms({"type": "albumentations", "name": "ColourJitter"})
    with pytest.raises(ConfigError, match="not allowed"):
        build_transforms({"type": "albumentations", "name": "albumentations.augmentations.Normalize"})
    with pytest.raises(ConfigError, match="albumentations GaussianBlur"):
        build_transforms({"type": "albumentations", "name": "GaussianBlur", "blur_limt": 3})
    with pytest.raises(RegistryError, match="did you mean 'horizontal_flip'"):
        build_transforms({"type": "horizontal_flipp"})


def test_no_transforms_means_normalisation_only() -> None:
    assert build_transforms(None) is None and build_transforms({}) is None


def test_collate_pads_bottom_right_with_mask() -> None:
    a = torch.full((3, 4, 6), 2.0)
    b = torch.full((3, 5, 3), -1.0)
    ta, tb = {"image_id": 1}, {"image_id": 2}
    images, mask, targets = collate([(a, ta), (b, tb)])
    assert images.shape == (2, 3, 5, 6) and mask.shape == (2, 5, 6) and mask.dtype == torch.bool
    assert targets == [ta, tb]
    assert (images[0, :, :4, :6] == 2).all() and (images[0, :, 4:] == 0).all()
    assert (images[1, :, :5, :3] == -1).all() and (images[1, :, :, 3:] == 0).all()
    assert mask[0].sum() == 6 and not mask[0, :4].any() and mask[0, 4].all()
    assert mask[1].sum() == 15 and not mask[1, :, :3].any() and mask[1, :, 3:].all()
