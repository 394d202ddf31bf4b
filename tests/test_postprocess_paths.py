"""One post-processing: ``detkit eval``, ``Detector.predict`` and the exported ONNX graph give the same boxes,
clipped to the original image, while the model's raw ``pred_boxes`` are left as they are."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.tools import make_checkpoint, tiny_lwdetr_config  # noqa: E402

import detkit  # noqa: E402
from detkit.cli import main  # noqa: E402
from detkit.config import compose, to_container  # noqa: E402
from detkit.data.build import build_datasets  # noqa: E402
from detkit.weights.io import load_checkpoint_file, save_checkpoint  # noqa: E402
from detkit.engine.evaluator import predict_dataset  # noqa: E402
from detkit.export.onnx import ort_session  # noqa: E402
from detkit.ops.box_ops import box_cxcywh_to_xyxy  # noqa: E402


def _coco_boxes(dets: list[dict]) -> np.ndarray:
    """xyxy of COCO-format detections, best score first (ties by position, as every path keeps top-k order)."""
    dets = sorted(dets, key=lambda d: -d["score"])
    return np.array([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)])


def test_eval_predict_and_onnx_give_the_same_clipped_boxes(tmp_path):
    cfg_path = tiny_lwdetr_config(tmp_path)
    ckpt = make_checkpoint(cfg_path, tmp_path / "ckpt.pth", seed=3)
    state = load_checkpoint_file(ckpt)
    with torch.no_grad():  # boxes 8x wider and taller than the reference points: many leave the image
        state["model"]["bbox_embed.layers.2.bias"][2:] = math.log(8.0)
    save_checkpoint(state, ckpt)

    det = detkit.Detector.from_checkpoint(ckpt, threshold=0.0)
    _, val = build_datasets(to_container(compose(cfg_path).data), train=False)
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(onnx_path), "--no-check"]) == 0
    session = ort_session(onnx_path)
    evaluated = predict_dataset(det.model, val, batch_size=2)
    outside = 0
    for i in range(len(val)):
        image, _, _ = val.read(i)
        h, w = image.shape[:2]
        image_id = int(val.image_info(i)["id"])
        tensor = det.preprocess(image)[None]
        with torch.no_grad():
            raw = box_cxcywh_to_xyxy(det.model(tensor, torch.zeros(1, *tensor.shape[2:], dtype=torch.bool))
                                     ["pred_boxes"])
        outside += int(((raw < 0) | (raw > 1)).any(-1).sum())
        by_eval = _coco_boxes([d for d in evaluated if d["image_id"] == image_id])
        by_predict = _coco_boxes(det.predict(image).to_coco(image_id))
        scores, _, boxes = session.run(None, {"images": tensor.numpy(),
                                              "orig_sizes": np.array([[h, w]], dtype=np.int64)})
        order = np.argsort(-scores[0], kind="stable")
        by_onnx = boxes[0][order]
        assert by_eval.shape == by_predict.shape == by_onnx.shape == (10, 4)  # num_select
        np.testing.assert_allclose(by_eval, by_predict, atol=0.02)  # COCO results are rounded to 0.01 px
        np.testing.assert_allclose(by_onnx, by_predict, atol=0.02)
        for boxes_of_path in (by_eval, by_predict, by_onnx):
            assert boxes_of_path.min() >= 0 and (boxes_of_path[:, 0::2] <= w + 1e-3).all()
            assert (boxes_of_path[:, 1::2] <= h + 1e-3).all()
    assert outside > 0  # the raw boxes do leave the image: the clipping above was exercised
