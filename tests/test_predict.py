"""``detkit predict`` and ``detkit.Detector``: boxes land on the drawn objects, outputs, and clear errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.tools import box_iou, draw_scene, make_checkpoint, tiny_lwdetr_config  # noqa: E402

import detkit  # noqa: E402
from detkit.cli import main  # noqa: E402
from detkit.weights.io import save_checkpoint  # noqa: E402
from detkit.errors import CheckpointError, DataError  # noqa: E402

CLASSES = ["red", "green", "blue"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 230)}
#: (height, width, box xyxy, class, shape): sizes differ, so a batch is padded, and the 96 px square resize of
#: the evaluation transform changes the aspect ratio
SCENES = [
    (120, 200, (30, 20, 110, 90), "red", "rect"),
    (150, 150, (70, 40, 140, 120), "green", "ellipse"),
    (90, 160, (10, 30, 70, 85), "blue", "rect"),
]


@pytest.fixture(scope="module")
def oracle_ckpt(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("oracle")
    state = {
        "model": {"scale": torch.ones(())},
        "config": {"model": {"type": "oracle_test", "num_classes": 3},
                   "data": {"val_transforms": {"type": "square_resize", "sizes": [96]}, "label_map": "contiguous"},
                   "plugins": {"imports": ["support.oracle_detector"], "disable": []}},
        "classes": CLASSES,
    }
    return save_checkpoint(state, tmp / "oracle.pth")


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("scenes")
    paths = []
    for i, (h, w, box, name, shape) in enumerate(SCENES):
        path = folder / f"scene{i}.{'png' if i % 2 == 0 else 'jpg'}"
        Image.fromarray(draw_scene(h, w, box, COLOURS[name], shape, seed=i)).save(path, quality=95)
        paths.append(path)
    return paths


def test_detector_api_boxes_land_on_objects(oracle_ckpt, scene_files):
    det = detkit.Detector.from_checkpoint(oracle_ckpt, threshold=0.5, plugin_imports=["support.oracle_detector"])
    assert det.classes == CLASSES
    # a path, a PIL image and a numpy array, predicted as one padded batch
    inputs = [scene_files[0], Image.open(scene_files[1]), np.asarray(Image.open(scene_files[2]).convert("RGB"))]
    preds = det.predict(inputs)
    assert len(preds) == 3
    for pred, (h, w, box, name, _) in zip(preds, SCENES):
        assert pred.image_size == (h, w)
        assert len(pred) == 1, pred
        assert pred.class_names == [name] and pred.labels.dtype == np.int64
        assert box_iou(pred.boxes[0], box) > 0.85, (pred.boxes[0], box)
        assert np.abs(pred.boxes[0] - np.array(box)).max() < 0.06 * max(h, w)
    # one image in, one Prediction out; the threshold applies
    single = det.predict(scene_files[0])
    np.testing.assert_allclose(single.boxes, preds[0].boxes, atol=1e-4)
    with torch.no_grad():
        det.model.scale.fill_(0.1)  # logits +-1: the object scores e / (e + 3 / e) = 0.711
    soft = det.predict(scene_files[0], threshold=0.7)
    assert len(soft) == 1 and abs(float(soft.scores[0]) - np.e / (np.e + 3 / np.e)) < 1e-4
    assert len(det.predict(scene_files[0], threshold=0.72)) == 0


def test_predict_cli_writes_images_and_json(oracle_ckpt, scene_files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(oracle_ckpt), "--plugin-import", "support.oracle_detector",
                 str(scene_files[0].parent), "--out", str(out),
                 "--threshold", "0.5"]) == 0
    for i, (h, w, box, name, _) in enumerate(SCENES):
        record = json.loads((out / f"scene{i}.json").read_text())
        assert (record["height"], record["width"]) == (h, w)
        (d,) = record["detections"]
        assert d["class_name"] == name and d["score"] > 0.99
        assert box_iou(d["box"], box) > 0.85
        drawn = out / f"scene{i}.{'png' if i % 2 == 0 else 'jpg'}"
        with Image.open(drawn) as im:
            assert im.size == (w, h)
            pixels = np.asarray(im.convert("RGB")).astype(int)
        # the box outline is drawn: the original image has no such change on the box edge
        original = np.asarray(Image.open(scene_files[i]).convert("RGB")).astype(int)
        assert np.abs(pixels - original).sum() > 0
    results = json.loads((out / "coco_results.json").read_text())
    images = json.loads((out / "coco_images.json").read_text())
    assert len(results) == 3 and len(images["images"]) == 3
    assert {r["category_id"] for r in results} == {1, 2, 3}  # contiguous label map: label + 1
    by_id = {im["id"]: im for im in images["images"]}
    for r in results:
        i = int(Path(by_id[r["image_id"]]["file_name"]).stem[-1])
        x, y, bw, bh = r["bbox"]
        assert box_iou([x, y, x + bw, y + bh], SCENES[i][2]) > 0.85
    assert "3 images, 3 detections" in capsys.readouterr().out


def test_detector_matches_the_evaluation_path(tmp_path):
    """A real (tiny, untrained) LW-DETR: Detector on an image = the evaluator's detections on the same image."""
    from detkit.config import compose, to_container
    from detkit.data.build import build_datasets
    from detkit.engine.evaluator import predict_dataset

    cfg_path = tiny_lwdetr_config(tmp_path)
    ckpt = make_checkpoint(cfg_path, tmp_path / "ckpt.pth")
    det = detkit.Detector.from_checkpoint(ckpt, threshold=0.0)
    _, val = build_datasets(to_container(compose(cfg_path).data), train=False)
    image, _, _ = val.read(0)
    pred = det.predict(image)
    ref = [d for d in predict_dataset(det.model, val, batch_size=2) if d["image_id"] == val.image_info(0)["id"]]
    assert len(pred) == len(ref) == 10  # num_select
    ref = sorted(ref, key=lambda d: -d["score"])
    np.testing.assert_allclose(pred.scores, [d["score"] for d in ref], atol=1e-4)
    got = pred.to_coco(val.image_info(0)["id"], val.cat_ids)
    np.testing.assert_allclose([g["bbox"] for g in got], [d["bbox"] for d in ref], atol=0.02)
    assert [g["category_id"] for g in got] == [d["category_id"] for d in ref]


def test_bad_inputs_give_clear_errors(oracle_ckpt, scene_files, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    text = tmp_path / "fake.jpg"
    text.write_text("not an image either")

    def run(*args: str) -> str:
        code = main(["predict", *args, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err
        return err

    assert "checkpoint not found" in run("--checkpoint", str(tmp_path / "missing.pth"), str(scene_files[0]))
    assert "no images in folder" in run("--checkpoint", str(oracle_ckpt), str(empty))
    err = run("--checkpoint", str(oracle_ckpt), str(text))
    assert "cannot read" in err and "fake.jpg" in err
    assert "no such image or folder" in run("--checkpoint", str(oracle_ckpt), str(tmp_path / "nope.png"))
    assert "threshold" in run("--checkpoint", str(oracle_ckpt), str(scene_files[0]), "--threshold", "2")
    no_config = save_checkpoint({"model": {"scale": torch.ones(())}}, tmp_path / "bare.pth")
    assert "no saved config" in run("--checkpoint", str(no_config), str(scene_files[0]))
    not_ckpt = tmp_path / "junk.pth"
    not_ckpt.write_bytes(b"\x00garbage")
    assert "junk.pth" in run("--checkpoint", str(not_ckpt), str(scene_files[0]))

    det = detkit.Detector.from_checkpoint(oracle_ckpt)
    with pytest.raises(DataError, match="shape"):
        det.predict(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(DataError, match="cannot read"):
        det.predict(text)
    with pytest.raises(CheckpointError, match="EMA"):
        detkit.Detector.from_checkpoint(oracle_ckpt, weights="ema")


def test_checkpoint_cannot_make_detkit_import_code(tmp_path, scene_files):
    """A checkpoint is untrusted: modules named in its saved plugins.imports are not imported unless the user says so."""
    marker = tmp_path / "imported"
    module = tmp_path / "evil_plugin_mod.py"
    module.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        ckpt = save_checkpoint({"model": {}, "classes": CLASSES,
                                "config": {"model": {"type": "oracle_test", "num_classes": 3},
                                           "plugins": {"imports": ["evil_plugin_mod"], "disable": []}}},
                               tmp_path / "evil.pth")
        with pytest.raises(CheckpointError, match=r"never imports code named inside a checkpoint.*--plugin-import evil_plugin_mod"):
            detkit.Detector.from_checkpoint(ckpt)
        assert main(["predict", "--checkpoint", str(ckpt), str(scene_files[0]), "--out", str(tmp_path / "o")]) == 2
        assert not marker.exists()
    finally:
        sys.path.remove(str(tmp_path))
