"""Every data set format on small files written by the tests: layouts, auto-detection, label maps, coco_gt."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_support import CLASSES, WRITERS, Img, assert_valid_target, expected_boxes, write_coco, xyxy_pixels

from detkit.data.build import build_dataset, build_datasets, detect_format
from detkit.errors import DataError

TRAIN = [
    Img("im1.jpg", 40, 30, [(2, 3, 10, 8, 1, False), (20, 5, 15, 20, 3, False)]),
    Img("im2.png", 32, 32, [(0, 0, 32, 32, 2, False)]),
]
VAL = [Img("v1.png", 24, 36, [(4, 4, 8, 8, 2, False), (1, 1, 3, 3, 1, False)])]
FORMAT_OF = {"coco": "coco", "coco_export": "coco", "yolo": "yolo", "voc": "voc"}


@pytest.mark.parametrize("layout", list(WRITERS))
def test_every_layout_loads_the_same_targets(tmp_path: Path, layout: str) -> None:
    WRITERS[layout](tmp_path, {"train": TRAIN, "val": VAL})
    fmt = FORMAT_OF[layout]
    assert detect_format(tmp_path) == fmt
    train, val = build_datasets({"root": str(tmp_path), "train_transforms": None, "val_transforms": None})
    assert train is not None and len(train) == 2 and len(val) == 1
    for ds, spec in ((train, TRAIN), (val, VAL)):
        assert ds.classes == CLASSES  # for VOC: the names found (a, b, c are not the 20 VOC classes)
        assert ds.cat_ids == ([0, 1, 2] if fmt == "yolo" else [1, 2, 3])
        assert ds.report.boxes_in == sum(len(i.anns) for i in spec) == ds.report.boxes_kept
        assert ds.report.num_problems == 0
        for k, img in enumerate(spec):
            image, target = ds[k]
            assert_valid_target(image, target, len(ds.classes))
            boxes, labels = expected_boxes(img, fmt)
            assert target["labels"].tolist() == labels.tolist()
            np.testing.assert_allclose(xyxy_pixels(target), boxes, atol=1e-3)
            assert target["orig_size"].tolist() == [img.h, img.w] == target["size"].tolist()


def test_cat_ids_per_format(tmp_path: Path) -> None:
    for layout in ("coco", "yolo", "voc"):
        WRITERS[layout](tmp_path / layout, {"train": TRAIN, "val": VAL})
        ds = build_dataset({"root": str(tmp_path / layout)}, "val", None)
        assert ds.cat_ids == {"coco": [1, 2, 3], "yolo": [0, 1, 2], "voc": [1, 2, 3]}[layout]


@pytest.mark.parametrize("layout", ["coco", "yolo", "voc"])
def test_coco_gt_in_original_pixels_and_category_ids(tmp_path: Path, layout: str) -> None:
    WRITERS[layout](tmp_path, {"val": VAL})
    ds = build_dataset({"root": str(tmp_path)}, "val", {"type": "lwdetr_val", "size": 64})
    gt = ds.coco_gt()
    img_id = ds[0][1]["image_id"]
    anns = gt.loadAnns(gt.getAnnIds(imgIds=[img_id]))
    got = sorted((a["category_id"], *np.round(a["bbox"], 3)) for a in anns)
    offset = 0 if layout == "yolo" else 1
    want = sorted((cat - 1 + offset, x, y, w, h) for x, y, w, h, cat, _ in VAL[0].anns)
    assert got == [tuple(map(float, g)) for g in want]
    assert gt.imgs[img_id]["width"] == 24 and gt.imgs[img_id]["height"] == 36
    assert {c["id"] for c in gt.loadCats(gt.getCatIds())} == set(ds.cat_ids)


def test_coco_official_label_map(tmp_path: Path) -> None:
    root = tmp_path / "c"
    root.joinpath("annotations").mkdir(parents=True)
    root.joinpath("val2017").mkdir()
    from test_data_support import save_image

    save_image(root / "val2017" / "x.png", Img("x.png", 20, 20))
    cats = [{"id": 1, "name": "person"}, {"id": 90, "name": "toothbrush"}, {"id": 44, "name": "bottle"}]
    anns = [{"id": 1, "image_id": 7, "category_id": 90, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 44, "bbox": [2, 2, 5, 5], "area": 25, "iscrowd": 0}]
    data = {"images": [{"id": 7, "file_name": "x.png", "width": 20, "height": 20}], "annotations": anns,
            "categories": cats}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    ds = build_dataset({"root": str(root), "label_map": "coco_official"}, "val", None)
    assert len(ds.classes) == 91 and ds.classes[90] == "toothbrush" and ds.classes[44] == "bottle"
    assert ds.classes[0] == "N/A" and ds.classes[12] == "N/A"
    assert ds.cat_ids == list(range(91))
    assert ds[0][1]["labels"].tolist() == [90, 44]
    contiguous = build_dataset({"root": str(root)}, "val", None)
    assert contiguous.classes == ["person", "bottle", "toothbrush"]
    assert contiguous[0][1]["labels"].tolist() == [2, 1]


def test_val_split_reuses_the_train_class_map(tmp_path: Path) -> None:
    write_coco(tmp_path, {"train": TRAIN, "val": VAL})
    data = json.loads((tmp_path / "annotations/instances_val2017.json").read_text())
    data["categories"] = data["categories"][:2]  # the val file lists fewer categories
    (tmp_path / "annotations/instances_val2017.json").write_text(json.dumps(data))
    train, val = build_datasets({"root": str(tmp_path), "train_transforms": None, "val_transforms": None})
    assert val.classes == train.classes == CLASSES


def test_yolo_dict_names_txt_lists_polygons_and_valid_alias(tmp_path: Path) -> None:
    from test_data_support import save_image

    for split in ("train", "valid"):
        save_image(tmp_path / split / "images" / "p.png", Img("p.png", 50, 40))
        (tmp_path / split / "labels").mkdir(parents=True)
        (tmp_path / split / "labels" / "p.txt").write_text("1 0.1 0.25 0.5 0.25 0.3 0.75\n0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "train.txt").write_text("./train/images/p.png\n")
    (tmp_path / "data.yaml").write_text("path: /nonexistent/moved\ntrain: train.txt\nval: valid/images\n"
                                        "names: {0: cat, 1: dog}\n")
    train, val = build_datasets({"root": str(tmp_path), "train_transforms": None, "val_transforms": None})
    assert train.classes == ["cat", "dog"] and len(train) == 1 and len(val) == 1
    _, target = val[0]
    assert target["labels"].tolist() == [1, 0]
    np.testing.assert_allclose(xyxy_pixels(target)[0], [5, 10, 25, 30], atol=1e-4)  # polygon's bounding box
    np.testing.assert_allclose(xyxy_pixels(target)[1], [20, 16, 30, 24], atol=1e-4)


def test_yolo_missing_label_file_is_background(tmp_path: Path) -> None:
    from test_data_support import write_yolo

    write_yolo(tmp_path, {"train": TRAIN})
    (tmp_path / "labels/train/im1.txt").unlink()
    ds = build_dataset({"root": str(tmp_path)}, "train", None)
    assert ds[0][1]["labels"].numel() == 0 and ds.report.counts["empty_image"] == 1


def test_voc_standard_classes_difficult_and_devkit_folder(tmp_path: Path) -> None:
    from test_data_support import write_voc

    root = tmp_path / "VOCdevkit" / "VOC2007"
    write_voc(root, {"train": [Img("000001.jpg", 30, 30, [(1, 1, 5, 5, 1, False), (3, 3, 9, 9, 2, True)])]})
    xml = root / "Annotations" / "000001.xml"
    xml.write_text(xml.read_text().replace("<name>a</name>", "<name>dog</name>").replace("<name>b</name>",
                                                                                          "<name>cat</name>"))
    ds = build_dataset({"root": str(tmp_path / "VOCdevkit")}, "train", None)
    assert len(ds.classes) == 20 and ds.classes[ds[0][1]["labels"][0]] == "dog"
    assert ds.report.counts["difficult"] == 1 and ds[0][1]["labels"].numel() == 1
    gt = ds.coco_gt()
    assert sorted(a["iscrowd"] for a in gt.dataset["annotations"]) == [0, 1]  # difficult kept as ignore region
    custom = build_dataset({"root": str(root), "classes": ["cat", "dog"]}, "train", None)
    assert custom.classes == ["cat", "dog"] and custom[0][1]["labels"].tolist() == [1]


def test_missing_root_and_annotation_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist.*nowhere"):
        build_datasets({"root": str(tmp_path / "nowhere")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"cannot detect.*COCO.*YOLO.*data\.yaml.*VOC"):
        build_datasets({"root": str(tmp_path / "empty")})
    write_coco(tmp_path / "c", {"train": TRAIN})
    with pytest.raises(DataError, match=r"split 'val'.*instances_val2017\.json.*valid/_annotations\.coco\.json"):
        build_datasets({"root": str(tmp_path / "c"), "train_transforms": None, "val_transforms": None})
    (tmp_path / "c/annotations/instances_train2017.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot parse COCO annotation file .*instances_train2017.json"):
        build_dataset({"root": str(tmp_path / "c")}, "train", None)
    with pytest.raises(DataError, match="VOC split list not found.*ImageSets/Main/val.txt"):
        from test_data_support import write_voc

        write_voc(tmp_path / "v", {"train": TRAIN})
        build_dataset({"root": str(tmp_path / "v"), "format": "voc"}, "val", None)
    with pytest.raises(DataError, match="YOLO data file not found.*data.yaml"):
        build_dataset({"root": str(tmp_path / "empty"), "format": "yolo"}, "val", None)


def test_auto_without_root_is_the_synthetic_set() -> None:
    train, val = build_datasets({"synthetic": {"num_train": 3, "num_val": 2}, "train_transforms": None})
    assert train.name == "synthetic/train" and len(val) == 2
    image, target = val[0]
    assert image.shape == (3, 640, 640)  # default val transform: LW-DETR square 640
    assert target["orig_size"].tolist() == [320, 320]


def test_unknown_format_and_synthetic_typo_are_config_errors() -> None:
    from detkit.errors import ConfigError, RegistryError

    with pytest.raises(RegistryError, match="did you mean 'yolo'"):
        build_dataset({"format": "yollo", "root": "."}, "train", None)
    with pytest.raises(ConfigError, match="did you mean 'num_train'"):
        build_dataset({"synthetic": {"num_trian": 3}}, "train", None)


def test_image_ids_and_class_map(tmp_path: Path) -> None:
    write_coco(tmp_path, {"val": VAL})
    ds = build_dataset({"root": str(tmp_path)}, "val", None)
    assert ds[0][1]["image_id"] == 1
    assert ds.class_map() == {"classes": CLASSES, "cat_ids": [1, 2, 3]}
    assert isinstance(ds.report.as_dict(), dict) and torch.is_tensor(ds[0][0])
