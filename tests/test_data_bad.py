"""Bad data never stops an epoch and never passes silently: each case, in every format, is handled and counted."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_support import CLASSES, WRITERS, Img, assert_valid_target, expected_boxes, pixels, xyxy_pixels

from detkit.data.build import build_dataset
from detkit.data.datasets.base import IMAGENET_MEAN, IMAGENET_STD
from detkit.errors import DataError

LAYOUTS = ["coco", "yolo", "voc"]


def load(tmp_path: Path, layout: str, images: list[Img], transforms=None):
    WRITERS[layout](tmp_path, {"train": images})
    # VOC's default class list is the names found; fix it so that a name outside it is an unknown category
    return build_dataset({"root": str(tmp_path), "classes": CLASSES}, "train", transforms)


def test_unreadable_image_is_replaced_warned_once_and_counted(tmp_path: Path, caplog) -> None:
    images = [Img("a.png", 20, 20, [(1, 1, 5, 5, 1, False)]),
              Img("b.png", 20, 20, [(2, 2, 5, 5, 2, False)], state="garbage"),
              Img("c.png", 20, 20, [(3, 3, 5, 5, 3, False)])]
    for layout in ("coco", "voc"):
        ds = load(tmp_path / layout, layout, images)
        with caplog.at_level(logging.WARNING, logger="detkit.data"):
            caplog.clear()
            first = ds[1][1]
            again = ds[1][1]
        assert first["image_id"] == again["image_id"] == ds[2][1]["image_id"]  # deterministic replacement: the next
        assert first["labels"].tolist() == [2]
        warnings = [r for r in caplog.records if "b.png" in r.getMessage()]
        assert len(warnings) == 1 and "cannot read image" in warnings[0].getMessage()
        assert ds.report.counts["unreadable_image"] == 1 and ds.report.examples["unreadable_image"] == ["b.png"]
        assert ds.report.counts["boxes_of_dropped_images"] == 1
        assert ds.report.boxes_in == ds.report.boxes_kept + ds.report.dropped_boxes
    ds = load(tmp_path / "yolo", "yolo", images)  # YOLO reads headers to size the boxes: dropped up front
    assert len(ds) == 2 and ds.report.counts["unreadable_image"] == 1


def test_image_deleted_after_building_is_replaced(tmp_path: Path) -> None:
    ds = load(tmp_path, "coco", [Img("a.png", 20, 20, [(1, 1, 5, 5, 1, False)]), Img("b.png", 20, 20)])
    (tmp_path / "train2017" / "a.png").unlink()
    _, target = ds[0]
    assert target["image_id"] == 2 and ds.report.counts["missing_image"] == 1


@pytest.mark.parametrize("layout", ["coco", "voc"])
def test_missing_image_is_dropped_and_counted(tmp_path: Path, layout: str) -> None:
    ds = load(tmp_path, layout, [Img("a.png", 20, 20, [(1, 1, 5, 5, 1, False)], state="missing"),
                                 Img("b.png", 20, 20, [(1, 1, 5, 5, 1, False)])])
    assert len(ds) == 1 and ds.report.counts["missing_image"] == 1
    assert ds.report.examples["missing_image"] == ["a.png"]
    assert ds.report.counts["boxes_of_dropped_images"] == 1


def test_every_image_unreadable_is_a_data_error(tmp_path: Path) -> None:
    ds = load(tmp_path, "coco", [Img("a.png", 20, 20, state="garbage"), Img("b.png", 20, 20, state="garbage")])
    with pytest.raises(DataError, match="none of the 2 images can be read"):
        ds[0]


BOXES = [
    (1, 1, 0, 5, 1, False),  # zero width
    (5, 5, -3, 4, 1, False),  # negative width
    (2, 2, 4, 0, 2, False),  # zero height
    (-5, -5, 10, 10, 1, False),  # partly outside: clipped to (0, 0, 5, 5)
    (15, 12, 100, 100, 2, False),  # partly outside: clipped to (15, 12, 20, 20)
    (30, 30, 5, 5, 3, False),  # entirely outside
    (-20, 2, 10, 5, 3, False),  # entirely outside (left)
    (2, 2, 5, 5, 7, False),  # unknown category id
    (3, 3, 6, 6, 1, True),  # crowd
    (4, 4, 4, 4, 3, False),  # fine
    (float("nan"), 1, 5, 5, 1, False),  # NaN
    (1, 1, float("inf"), 5, 2, False),  # infinite
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bad_boxes_are_dropped_clipped_or_excluded_and_counted(tmp_path: Path, layout: str) -> None:
    img = Img("a.png", 20, 20, BOXES)
    ds = load(tmp_path, layout, [img])
    image, target = ds[0]
    assert_valid_target(image, target, 3)
    boxes, labels = expected_boxes(img, layout)
    assert target["labels"].tolist() == labels.tolist() == ([0, 1, 2] if layout != "yolo" else [0, 1, 0, 2])
    np.testing.assert_allclose(xyxy_pixels(target), boxes, atol=1e-4)
    c = ds.report.counts
    assert c["degenerate_box"] == 3 and c["box_outside_image"] == 2 and c["unknown_category"] == 1
    assert c["clipped_box"] == 2 and c["invalid_box"] == 2
    assert c["crowd" if layout == "coco" else "difficult"] == (0 if layout == "yolo" else 1)
    assert ds.report.boxes_in == len(BOXES) == ds.report.boxes_kept + ds.report.dropped_boxes
    assert [Path(e).name for e in ds.report.examples["degenerate_box"]] == ["a.png"]


def test_crowd_is_an_ignore_region_in_coco_gt(tmp_path: Path) -> None:
    ds = load(tmp_path, "coco", [Img("a.png", 20, 20, [(1, 1, 5, 5, 1, False), (3, 3, 8, 8, 2, True)])])
    assert ds[0][1]["labels"].tolist() == [0]
    gt = ds.coco_gt()
    crowd = [a for a in gt.dataset["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1 and crowd[0]["bbox"] == [3, 3, 8, 8] and crowd[0]["category_id"] == 2


def test_coco_gt_drops_unusable_annotations_and_images(tmp_path: Path) -> None:
    ds = load(tmp_path, "coco", [Img("a.png", 20, 20, BOXES),
                                 Img("m.png", 9, 9, [(1, 1, 2, 2, 1, False)], state="missing")])
    gt = ds.coco_gt()
    assert [i["file_name"] for i in gt.dataset["images"]] == ["a.png"]
    # kept: 2 clipped + 1 fine (original coordinates, like the official evaluation) + 1 crowd
    assert len(gt.dataset["annotations"]) == 4


def test_orphan_annotations_and_malformed_entries_are_counted(tmp_path: Path) -> None:
    import json

    WRITERS["coco"](tmp_path, {"train": [Img("a.png", 20, 20, [(1, 1, 5, 5, 1, False)])]})
    path = tmp_path / "annotations/instances_train2017.json"
    data = json.loads(path.read_text())
    data["annotations"] += [{"id": 9, "image_id": 42, "category_id": 1, "bbox": [1, 1, 2, 2]},
                            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 2]},
                            {"id": 11, "image_id": 1, "category_id": 1}]
    path.write_text(json.dumps(data))
    ds = build_dataset({"root": str(tmp_path)}, "train", None)
    assert ds.report.counts["orphan_annotation"] == 1 and ds.report.counts["bad_annotation"] == 2
    assert ds.report.boxes_in == 4 == ds.report.boxes_kept + ds.report.dropped_boxes


def test_malformed_yolo_lines_and_voc_files_are_counted(tmp_path: Path) -> None:
    WRITERS["yolo"](tmp_path / "y", {"train": [Img("a.png", 20, 20, [(1, 1, 5, 5, 1, False)])]})
    label = tmp_path / "y/labels/train/a.txt"
    label.write_text(label.read_text() + "1 0.5 0.5\nx 0.5 0.5 0.1 0.1\n1.5 0.5 0.5 0.1 0.1\n1 a b c d\n")
    ds = build_dataset({"root": str(tmp_path / "y")}, "train", None)
    assert ds.report.counts["bad_annotation"] == 3 and ds.report.counts["unknown_category"] == 1
    assert ds[0][1]["labels"].tolist() == [0]
    WRITERS["voc"](tmp_path / "v", {"train": [Img("a.png", 20, 20), Img("b.png", 20, 20, [(1, 1, 5, 5, 1, False)])]})
    (tmp_path / "v/Annotations/a.xml").write_text("<annotation><broken")
    ds = build_dataset({"root": str(tmp_path / "v")}, "train", None)
    assert len(ds) == 1 and ds.report.counts["bad_annotation_file"] == 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_images_without_boxes_are_background(tmp_path: Path, layout: str) -> None:
    ds = load(tmp_path, layout, [Img("a.png", 20, 20), Img("b.png", 20, 20, [(1, 1, 5, 5, 1, False)])])
    assert len(ds) == 2 and ds.report.counts["empty_image"] == 1
    image, target = ds[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert ds.report.num_problems == 0  # background images are not a problem


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "1", "CMYK", "I;16"])
def test_non_rgb_images_become_rgb(tmp_path: Path, mode: str) -> None:
    ds = load(tmp_path, "coco", [Img("a.png", 12, 10, [(1, 1, 5, 5, 1, False)], mode=mode)])
    image, target = ds[0]
    assert image.shape == (3, 10, 12) and torch.isfinite(image).all()
    assert ds.report.counts["converted_to_rgb"] == 1
    if mode in ("L", "LA", "I;16"):  # grey levels: the three channels carry the same value
        raw = image * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_exif_rotated_image_is_upright(tmp_path: Path, layout: str) -> None:
    img = Img("a.jpg", 24, 12, [(2, 1, 10, 6, 1, False)], exif=6)  # stored 12 x 24, displayed 24 x 12
    ds = load(tmp_path, layout, [img])
    image, target = ds[0]
    assert target["orig_size"].tolist() == [12, 24] and image.shape == (3, 12, 24)
    raw = (image * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) * 255
    upright = torch.from_numpy(pixels(24, 12, 0)).permute(2, 0, 1).float()
    assert (raw - upright).abs().mean() < 8  # JPEG noise only; a flipped gradient would be off by ~100
    assert ds.report.counts["exif_rotated"] == 1 and ds.report.counts["size_mismatch"] == 0
    np.testing.assert_allclose(xyxy_pixels(target), [[2, 1, 12, 7]], atol=1e-4)


def test_size_mismatch_is_warned_and_boxes_clipped(tmp_path: Path, caplog) -> None:
    import json

    WRITERS["coco"](tmp_path, {"train": [Img("a.png", 20, 20, [(1, 1, 5, 5, 1, False), (14, 14, 5, 5, 2, False)])]})
    path = tmp_path / "annotations/instances_train2017.json"
    data = json.loads(path.read_text())
    data["images"][0]["width"] = data["images"][0]["height"] = 40  # the file is really 20 x 20
    data["annotations"][1]["bbox"] = [25, 25, 10, 10]  # inside 40 x 40, outside the real image
    path.write_text(json.dumps(data))
    ds = build_dataset({"root": str(tmp_path)}, "train", None)
    with caplog.at_level(logging.WARNING, logger="detkit.data"):
        _, target = ds[0]
        ds[0]
    assert target["labels"].tolist() == [0]
    assert ds.report.counts["size_mismatch"] == 1 and ds.report.counts["box_outside_image"] == 1
    assert sum("40x40" in r.getMessage() for r in caplog.records) == 1
    assert ds.report.boxes_in == ds.report.boxes_kept + ds.report.dropped_boxes
