"""Tiled prediction: windows, merging across seams (oracle detector), AP of tiles vs the image made of them, and
the same tiled prediction from an exported ONNX file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.tools import box_iou, make_checkpoint, tiny_lwdetr_config  # noqa: E402

import detkit  # noqa: E402
from detkit.cli import main  # noqa: E402
from detkit.weights.io import save_checkpoint  # noqa: E402
from detkit.errors import ConfigError  # noqa: E402
from detkit.tiling import resolve_tile, tile_detections, tile_windows  # noqa: E402

CLASSES = ["red", "green", "blue"]
ORACLE_MODEL = {"type": "oracle_test", "num_classes": 3, "num_queries": 12, "components": True}
VAL_TRANSFORMS = {"type": "square_resize", "sizes": [128]}
PLUGINS = {"imports": ["support.oracle_detector"], "disable": []}


def colour(label: int, saturation: float) -> tuple[int, int, int]:
    """A colour of dominant channel ``label`` whose saturation (max - min, 0-1) is ``saturation``."""
    low = int(round(40 + (1 - saturation) * 150))
    value = [low, low, low]
    value[label] = min(255, low + int(round(saturation * 255)))
    return tuple(value)  # type: ignore[return-value]


def background(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 120, np.float32) + rng.normal(0, 3, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def oracle_ckpt(tmp_path_factory) -> Path:
    state = {"model": {"scale": torch.ones(())}, "classes": CLASSES,
             "config": {"model": ORACLE_MODEL, "data": {"val_transforms": VAL_TRANSFORMS, "label_map": "contiguous"},
                        "plugins": PLUGINS}}
    return save_checkpoint(state, tmp_path_factory.mktemp("oracle") / "oracle.pth")


def test_windows_cover_the_image_with_at_least_the_overlap():
    windows = tile_windows(300, 420, 128, 0.25)
    xs = sorted({w[0] for w in windows})
    ys = sorted({w[1] for w in windows})
    assert xs == [0, 73, 146, 219, 292] and ys == [0, 86, 172]
    assert all(w[2] - w[0] == 128 and w[3] - w[1] == 128 for w in windows)
    assert max(w[2] for w in windows) == 420 and max(w[3] for w in windows) == 300
    assert min(a + 128 - b for a, b in zip(xs, xs[1:])) >= 0.25 * 128
    assert tile_windows(100, 90, 128, 0.2) == [(0, 0, 90, 100)]  # smaller than a tile: one window, the image
    with pytest.raises(ConfigError, match="overlap"):
        tile_windows(300, 300, 128, 0.95)
    assert resolve_tile("auto", (1000, 300), 128) == 128 and resolve_tile("auto", (250, 200), 128) is None
    assert resolve_tile(0, (5000, 5000), 128) is None and resolve_tile(96, (50, 50), 128) == 96


def test_seams_neither_drop_nor_duplicate_objects(oracle_ckpt):
    # 300 x 420, tiles of 128 with overlap 0.25: windows start at x 0, 73, 146, 219, 292 and y 0, 86, 172
    objects = [
        ((90, 20, 120, 50), 0, 0.9),     # inside the band two windows share: seen whole twice
        ((150, 90, 195, 125), 1, 0.8),   # inside the corner four windows share: seen whole four times
        ((100, 230, 260, 270), 2, 0.7),  # 160 px wide, wider than a tile: cut in each of four windows
        ((330, 60, 360, 200), 0, 0.6),   # 140 px tall: cut in every window row, two window columns
        ((380, 250, 410, 290), 1, 0.95),  # in one window only
        ((0, 0, 30, 25), 2, 0.85),       # on the image corner
    ]
    image = background(300, 420, seed=1)
    for (x1, y1, x2, y2), label, sat in objects:
        image[y1:y2, x1:x2] = colour(label, sat)
    det = detkit.Detector.from_checkpoint(oracle_ckpt, threshold=0.1, plugin_imports=["support.oracle_detector"])

    def detect(crops):
        return det._detect(crops)

    raw = tile_detections(detect, image, 128, 0.25)
    assert len(raw.scores) > 2 * len(objects)  # the seams do repeat and cut objects
    for whole_image in (False, True):
        pred = det.predict(image, tile=128, overlap=0.25, whole_image=whole_image)
        assert len(pred) == len(objects), (whole_image, pred.boxes)
        for box, label, _ in objects:
            ious = [box_iou(b, box) for b in pred.boxes]
            best = int(np.argmax(ious))
            assert ious[best] > (0.97 if not whole_image else 0.8), (box, pred.boxes[best])
            assert int(pred.labels[best]) == label
    # the same image without tiles: the 128 px model input merges nothing but sees the objects 3x smaller
    assert len(det.predict(image, tile=0)) <= len(objects)


def _known_tiles(rng: np.random.Generator, count: int) -> list[tuple[np.ndarray, list[tuple]]]:
    """``count`` 128 px images with 1-3 objects each (4 px from the edges, apart from each other), and their ground
    truth: box sides moved by up to 12% of the size and one label in eight wrong, so the AP is far from 1."""
    tiles = []
    for t in range(count):
        image = background(128, 128, seed=100 + t)
        placed: list[tuple[int, int, int, int]] = []
        truth = []
        for _ in range(int(rng.integers(1, 4))):
            for _attempt in range(50):
                w, h = (int(v) for v in rng.integers(14, 50, 2))
                x1, y1 = int(rng.integers(4, 124 - w)), int(rng.integers(4, 124 - h))
                box = (x1, y1, x1 + w, y1 + h)
                if all(box[0] > b[2] + 4 or box[2] < b[0] - 4 or box[1] > b[3] + 4 or box[3] < b[1] - 4
                       for b in placed):
                    break
            else:
                continue
            placed.append(box)
            label = int(rng.integers(0, 3))
            image[box[1]:box[3], box[0]:box[2]] = colour(label, float(rng.uniform(0.55, 1.0)))
            jitter = rng.uniform(-0.12, 0.12, 4) * np.array([w, h, w, h])
            gt_box = np.asarray(box, float) + jitter
            gt_label = label if rng.random() > 0.125 else (label + 1) % 3
            truth.append((gt_box.tolist(), gt_label))
        tiles.append((image, truth))
    return tiles


def _write_coco(root: Path, images: list[tuple[np.ndarray, list[tuple]]]) -> None:
    split = root / "val"
    split.mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    for i, (image, truth) in enumerate(images):
        Image.fromarray(image).save(split / f"{i}.png")
        coco["images"].append({"id": i + 1, "file_name": f"{i}.png", "height": image.shape[0],
                               "width": image.shape[1]})
        for (x1, y1, x2, y2), label in truth:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1,
                                        "category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                        "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    (split / "_annotations.coco.json").write_text(json.dumps(coco))


def test_tiled_eval_of_a_mosaic_scores_the_ap_of_its_tiles(oracle_ckpt, tmp_path, capsys):
    tiles = _known_tiles(np.random.default_rng(0), 9)
    mosaic = np.zeros((384, 384, 3), np.uint8)
    truth = []
    for k, (image, boxes) in enumerate(tiles):
        x0, y0 = 128 * (k % 3), 128 * (k // 3)
        mosaic[y0:y0 + 128, x0:x0 + 128] = image
        truth += [([b[0] + x0, b[1] + y0, b[2] + x0, b[3] + y0], label) for b, label in boxes]
    _write_coco(tmp_path / "alone", tiles)
    _write_coco(tmp_path / "mosaic", [(mosaic, truth)])
    config = tmp_path / "oracle.yaml"
    config.write_text(yaml.safe_dump({"model": ORACLE_MODEL, "plugins": PLUGINS, "runtime": {"device": "cpu"},
                                      "data": {"format": "coco", "num_workers": 0, "val_transforms": VAL_TRANSFORMS}}))
    # the tiles alone, whole, through the evaluator of training
    from detkit.data.build import build_datasets
    from detkit.engine.evaluator import coco_evaluate, predict_dataset
    from detkit.loading import load_for_inference

    _, alone = build_datasets({"format": "coco", "root": str(tmp_path / "alone"), "val_transforms": VAL_TRANSFORMS},
                              train=False)
    model = load_for_inference(oracle_ckpt, plugin_imports=["support.oracle_detector"]).model
    alone_metrics, _ = coco_evaluate(alone.coco_gt(), predict_dataset(model, alone, batch_size=9))
    assert 0.2 < alone_metrics["AP"] < 0.9  # imperfect: the AP can tell a merge error
    # the image made of them, in tiles that do not line up with them, through `detkit eval --tile`
    out = tmp_path / "mosaic.json"
    assert main(["eval", str(config), f"data.root={tmp_path / 'mosaic'}", "--checkpoint", str(oracle_ckpt),
                 "--out", str(out), "--tile", "128", "--overlap", "0.25"]) == 0
    capsys.readouterr()
    tiled = json.loads(out.read_text())["metrics"]
    for key in ("AP", "AP50", "AP75"):
        assert abs(tiled[key] - alone_metrics[key]) <= 0.01, (key, tiled, alone_metrics)


def test_onnx_file_predicts_in_tiles_as_its_checkpoint(tmp_path, capsys):
    cfg = tiny_lwdetr_config(tmp_path)
    ckpt = make_checkpoint(cfg, tmp_path / "ckpt.pth", seed=5)
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(onnx_path), "--no-check"]) == 0
    image = np.asarray(background(200, 330, seed=7))
    image[40:90, 150:230] = colour(0, 0.9)
    path = tmp_path / "big.png"
    Image.fromarray(image).save(path)
    records = {}
    for runtime, model in (("torch", ckpt), ("onnxruntime", onnx_path)):
        out = tmp_path / runtime
        assert main(["predict", "--checkpoint", str(model), "--runtime", runtime, str(path), "--out", str(out),
                     "--tile", "128", "--overlap", "0.3", "--threshold", "0.0", "--no-draw"]) == 0
        records[runtime] = json.loads((out / "big.json").read_text())["detections"]
    assert "in 128 px tiles" in capsys.readouterr().out
    torch_dets, onnx_dets = records["torch"], records["onnxruntime"]
    assert len(torch_dets) == len(onnx_dets) > 10  # several windows' detections, merged
    for d in torch_dets:
        close = [o for o in onnx_dets if o["label"] == d["label"] and abs(o["score"] - d["score"]) < 1e-3
                 and np.abs(np.subtract(o["box"], d["box"])).max() < 0.5]
        assert close, d
    with pytest.raises(SystemExit):
        main(["predict", "--checkpoint", str(onnx_path), "--runtime", "tensorrt", str(path), "--out", str(out)])
    assert main(["predict", "--checkpoint", str(onnx_path), str(path), "--out", str(tmp_path / "x")]) == 2
    assert "--runtime onnxruntime" in capsys.readouterr().err
