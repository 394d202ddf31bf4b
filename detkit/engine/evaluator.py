"""COCO evaluation of a detector on a data set (pycocotools).

Three layers, so that tools can reuse the parts they need:

- :func:`predict_dataset` runs the model and returns COCO-format detections (``image_id``, ``category_id``,
  ``bbox`` as xywh in original pixels, ``score``), gathered on rank 0 when running distributed;
- :func:`coco_evaluate` runs ``COCOeval`` on detections and returns the 12 standard numbers plus the ``COCOeval``
  object (per-class precision arrays for tables and PR curves);
- :func:`evaluate` does both.

A data set provides ``coco_gt() -> pycocotools.coco.COCO`` (ground truth with the original category ids) and
``cat_ids`` (label index -> category id).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from detkit.engine import distributed as du

#: the 12 numbers of ``COCOeval.stats``, in order
COCO_METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
                                 "ARl")


def _default_collate() -> Callable[[list[Any]], Any]:
    from detkit.data.collate import collate

    return collate


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


@torch.no_grad()
def predict_dataset(model: nn.Module, dataset: Dataset, *, batch_size: int = 2, num_workers: int = 0,
                    device: torch.device | str | None = None, collate_fn: Callable[[list[Any]], Any] | None = None,
                    amp_dtype: torch.dtype | None = None, score_threshold: float = 0.0,
                    gather: bool = True) -> list[dict[str, Any]]:
    """Run ``model`` over ``dataset`` and return COCO-format detections.

    When a process group is initialised each rank predicts its share (samples ``rank::world``) and, with
    ``gather=True``, rank 0 receives the full list and the other ranks an empty one (only rank 0 evaluates). The
    model is put in eval mode and restored afterwards.
    """
    model = _unwrap(model)
    if device is None:
        device = next(iter(model.parameters())).device
    device = torch.device(device)
    cat_ids = list(getattr(dataset, "cat_ids"))
    from detkit.data.report import CountedLoader, CountingCollate
    from detkit.engine.sampling import SeededDataset, ShardSampler

    sampler = ShardSampler(len(dataset), du.get_rank(), du.get_world_size())  # type: ignore[arg-type]
    # data problems counted in the workers come back with the batches, into the data set's report
    batches = DataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                         collate_fn=CountingCollate(collate_fn or _default_collate()), generator=torch.Generator(),
                         persistent_workers=False)
    loader = CountedLoader(batches, getattr(dataset, "report", None))
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    try:
        for images, mask, targets in loader:
            images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = model(images, mask)
            outputs = {k: v.float() for k, v in outputs.items() if isinstance(v, torch.Tensor)}
            orig_sizes = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets]).to(device)
            preds = model.postprocessor(outputs, orig_sizes)
            for target, pred in zip(targets, preds):
                results.extend(_to_coco(int(target["image_id"]), pred, cat_ids, score_threshold))
    finally:
        model.train(was_training)
    if gather and du.is_dist():
        parts = du.gather_object(results)
        results = [r for part in parts for r in part] if parts is not None else []
    return results


def _to_coco(image_id: int, pred: dict[str, torch.Tensor], cat_ids: Sequence[int],
             score_threshold: float) -> list[dict[str, Any]]:
    boxes = pred["boxes"].detach().float().cpu()
    scores = pred["scores"].detach().float().cpu()
    labels = pred["labels"].detach().cpu()
    keep = (scores > score_threshold) & (labels >= 0) & (labels < len(cat_ids)) & torch.isfinite(boxes).all(1)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    xywh = torch.cat([boxes[:, :2], (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)], dim=1)
    return [{"image_id": image_id, "category_id": int(cat_ids[int(lab)]), "bbox": [round(float(v), 3) for v in b],
             "score": round(float(s), 5)} for b, s, lab in zip(xywh.tolist(), scores.tolist(), labels.tolist())]


def coco_evaluate(coco_gt: Any, detections: list[dict[str, Any]], verbose: bool = False) -> tuple[dict[str, float],
                                                                                                  Any]:
    """Run ``COCOeval`` (bbox) and return ``({AP, AP50, ..., ARl}, cocoeval)``; ``cocoeval`` is None without
    detections (every metric is then 0)."""
    from pycocotools.cocoeval import COCOeval

    if not detections or not coco_gt.getAnnIds():
        return {k: 0.0 for k in COCO_METRICS}, None
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    if verbose:
        print(sink.getvalue(), end="")
    # COCOeval reports -1 for an area range without ground truth; 0 is the honest number to plot and compare
    stats = {k: float(max(v, 0.0)) for k, v in zip(COCO_METRICS, np.asarray(ev.stats).tolist())}
    return stats, ev


def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 2, num_workers: int = 0,
             device: torch.device | str | None = None, collate_fn: Callable[[list[Any]], Any] | None = None,
             amp_dtype: torch.dtype | None = None, verbose: bool = False) -> dict[str, float]:
    """COCO bbox metrics of ``model`` on ``dataset``: the 12 numbers keyed ``AP, AP50, ..., ARl`` (0-1 scale).

    Distributed: every rank predicts its share; rank 0 evaluates and every rank returns the same numbers.
    """
    detections = predict_dataset(model, dataset, batch_size=batch_size, num_workers=num_workers, device=device,
                                 collate_fn=collate_fn, amp_dtype=amp_dtype, gather=True)
    metrics: dict[str, float] | None = None
    if du.is_main_process():
        metrics, _ = coco_evaluate(dataset.coco_gt(), detections, verbose=verbose)  # type: ignore[attr-defined]
    return du.broadcast_object(metrics)

