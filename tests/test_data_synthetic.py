"""The built-in synthetic data set: deterministic, disjoint splits, the promised ranges, COCO round trip."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from detkit.config import compose, to_container
from detkit.data.build import build_dataset, build_datasets
from detkit.data.cli import main as data_main
from detkit.data.datasets.synthetic import synthetic
from detkit.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


def test_deterministic_from_the_seed() -> None:
    a, b = synthetic(num_train=6), synthetic(num_train=6)
    for i in (0, 5):
        (ia, ba, la), (ib, bb, lb) = a.read(i), b.read(i)
        assert np.array_equal(ia, ib) and np.array_equal(ba, bb) and np.array_equal(la, lb)
    c = synthetic(num_train=6, seed=1)
    assert not np.array_equal(a.read(0)[0], c.read(0)[0])
    ta, tb = a[3], synthetic(num_train=6)[3]  # through __getitem__ too
    assert torch.equal(ta[0], tb[0]) and torch.equal(ta[1]["boxes"], tb[1]["boxes"])


def test_validation_split_is_disjoint() -> None:
    train, val = synthetic("train", num_train=40), synthetic("val", num_val=40)
    train_hashes = {_digest(train.read(i)[0]) for i in range(40)}
    val_hashes = {_digest(val.read(i)[0]) for i in range(40)}
    assert len(train_hashes) == 40 and len(val_hashes) == 40 and not train_hashes & val_hashes
    explicit = synthetic("val", num_val=3, seed=0, val_seed=7)
    assert not np.array_equal(explicit.read(0)[0], val.read(0)[0])


def test_classes_sizes_counts_and_boxes_in_range() -> None:
    ds = synthetic(num_train=300, shapes=["circle", "square", "triangle", "star", "cross", "ring"])
    counts, classes, rel = Counter(), Counter(), []
    for i in range(300):
        boxes, labels, _, _ = ds.annotations(i)
        counts[len(labels)] += 1
        classes.update(labels.tolist())
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 320).all() and (boxes[:, 3] <= 320).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        rel += (np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / 320).tolist()
    assert min(counts) == 1 and max(counts) == 8 and len(counts) == 8
    assert set(classes) == set(range(6)) and min(classes.values()) > 0.1 * sum(classes.values()) / 6
    assert 0.04 < min(rel) < 0.1 and 0.45 < max(rel) < 0.65
    assert ds.classes == ["circle", "square", "triangle", "star", "cross", "ring"] and ds.cat_ids == [1, 2, 3, 4, 5, 6]


def test_objects_are_visible_and_not_camouflaged() -> None:
    """Pixels at the centre of each unoccluded object differ clearly from the image's border (background)."""
    ds = synthetic(num_train=30, shapes=["circle"], clutter=1.0)
    for i in range(30):
        image, boxes, _ = ds.read(i)
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(float).mean(0)
        top = boxes[-1]  # drawn last: never occluded
        cx, cy = int((top[0] + top[2]) / 2), int((top[1] + top[3]) / 2)
        centre = image[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).astype(float).mean(0)
        assert np.abs(centre - border).sum() > 40, i


def test_cheap_to_generate() -> None:
    ds = synthetic(num_train=20)
    start = time.perf_counter()
    for i in range(20):
        ds.read(i)
    assert (time.perf_counter() - start) / 20 < 0.2  # typically ~10 ms on one core


def test_coco_gt_matches_targets() -> None:
    ds = synthetic("val", num_val=5)
    gt = ds.coco_gt()
    for i in range(5):
        boxes, labels, _, _ = ds.annotations(i)
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[i + 1]))
        assert [a["category_id"] for a in anns] == (labels + 1).tolist()
        np.testing.assert_allclose([a["bbox"] for a in anns], np.c_[boxes[:, :2], boxes[:, 2:] - boxes[:, :2]])


def test_bad_options_are_data_errors() -> None:
    with pytest.raises(DataError, match="shapes must be distinct names from circle"):
        synthetic(shapes=["circle", "hexagon"])
    with pytest.raises(DataError, match="min_objects <= max_objects"):
        synthetic(min_objects=5, max_objects=2)
    with pytest.raises(DataError, match="splits 'train' and 'val'"):
        synthetic(split="extra")


def test_data_synth_writes_a_coco_layout_read_back_identically(tmp_path: Path, capsys) -> None:
    out = tmp_path / "shapes"
    assert data_main(["synth", "--out", str(out), "--num-train", "4", "--num-val", "3", "--size", "96",
                      "--seed", "5"]) == 0
    assert (out / "annotations" / "instances_train2017.json").is_file() and len(list((out / "val2017").iterdir())) == 3
    assert "instances_val2017.json" in capsys.readouterr().out
    for split, n in (("train", 4), ("val", 3)):
        original = synthetic(split, image_size=96, num_train=4, num_val=3, seed=5)
        loaded = build_dataset({"root": str(out)}, split, None)
        assert loaded.classes == original.classes and loaded.cat_ids == original.cat_ids and len(loaded) == n
        assert loaded.report.num_problems == 0
        for i in range(n):
            (img_a, tgt_a), (img_b, tgt_b) = original[i], loaded[i]
            assert torch.equal(img_a, img_b)  # PNG: lossless
            assert torch.equal(tgt_a["labels"], tgt_b["labels"]) and tgt_a["image_id"] == tgt_b["image_id"]
            assert torch.allclose(tgt_a["boxes"], tgt_b["boxes"], atol=1e-6)
    with pytest.raises(DataError, match="not empty"):
        data_main(["synth", "--out", str(out)])


def test_synthetic_config_fragment_builds() -> None:
    cfg = compose(REPO / "configs/_base_/data/synthetic.yaml",
                  ["data.synthetic.num_train=4", "data.synthetic.num_val=2"])
    train, val = build_datasets(to_container(cfg.data))
    image, target = train[0]
    assert image.shape[1] in (256, 320) and image.shape[1] == image.shape[2]
    assert val[0][0].shape == (3, 320, 320) and len(train) == 4 and len(val) == 2


def test_dataloader_workers_pickle_and_draw_different_augmentations() -> None:
    import pickle

    from detkit.data.collate import collate

    ds = build_dataset({"synthetic": {"num_train": 8, "image_size": 64}},
                       "train", {"type": "lwdetr_train", "sizes": [64, 128, 192], "crop_prob": 0.0})
    clone = pickle.loads(pickle.dumps(ds))  # what a spawn-started worker receives
    assert torch.equal(clone[0][1]["labels"], ds[0][1]["labels"])
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate)
    sizes = [images.shape[-1] for images, _, _ in loader]
    assert len(sizes) == 8 and len(set(sizes)) > 1  # each worker reseeded: not the same draw in lockstep
    per_worker = [sizes[0::2], sizes[1::2]]
    assert per_worker[0] != per_worker[1]


def test_coco_gt_works_with_cocoeval() -> None:
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    ds = synthetic("val", num_val=6)
    gt = ds.coco_gt()
    dets = [{**a, "score": 1.0} for a in gt.dataset["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[1] == pytest.approx(1.0)  # perfect detections: AP50 = 1
