"""COCO evaluation: an oracle scores 1.0, label -> category id mapping, empty predictions, shapes of the output."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.tiny_detector import TinyShapes  # noqa: E402

from detkit.engine.evaluator import COCO_METRICS, coco_evaluate, evaluate, predict_dataset  # noqa: E402


class Oracle(nn.Module):
    """Predicts the ground truth of the images in data-set order (optionally with shifted labels)."""

    def __init__(self, ds: TinyShapes, label_shift: int = 0, drop_all: bool = False) -> None:
        super().__init__()
        self.ds, self.shift, self.drop_all = ds, label_shift, drop_all
        self.dummy = nn.Parameter(torch.zeros(1))
        self.next = 0
        self.postprocessor = self._post

    def forward(self, images, mask):
        return {"pred_logits": torch.zeros(images.shape[0], 1, 1), "pred_boxes": torch.zeros(images.shape[0], 1, 4)}

    def _post(self, outputs, orig_sizes):
        out = []
        for _ in range(outputs["pred_logits"].shape[0]):
            objs = [] if self.drop_all else self.ds.annotations[self.next]
            self.next += 1
            boxes = torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h) in objs]).reshape(-1, 4)
            labels = torch.tensor([(lab + self.shift) % len(self.ds.classes) for lab, _ in objs], dtype=torch.long)
            out.append({"boxes": boxes, "scores": torch.ones(len(objs)), "labels": labels})
        return out


def test_oracle_scores_one_and_labels_map_to_category_ids():
    ds = TinyShapes(6, flip=False, cat_ids=[5, 17, 42])
    metrics = evaluate(Oracle(ds), ds, batch_size=4)
    assert list(metrics) == list(COCO_METRICS)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AR100"] == pytest.approx(1.0)
    assert metrics["APl"] == 0.0  # no large objects at 32 px: COCO's -1 is reported as 0
    wrong = evaluate(Oracle(ds, label_shift=1), ds, batch_size=4)
    assert wrong["AP"] < 0.05
    dets = predict_dataset(Oracle(ds), ds, batch_size=4)
    assert {d["category_id"] for d in dets} <= {5, 17, 42}
    x, y, w, h = ds.annotations[0][0][1]
    assert dets[0]["image_id"] == 0 and dets[0]["bbox"] == pytest.approx([x, y, w, h], abs=1e-3)


def test_no_detections_gives_zeros():
    ds = TinyShapes(3, flip=False)
    metrics = evaluate(Oracle(ds, drop_all=True), ds)
    assert metrics == {k: 0.0 for k in COCO_METRICS}
    stats, ev = coco_evaluate(ds.coco_gt(), [])
    assert ev is None and stats["AP"] == 0.0
