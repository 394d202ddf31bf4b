"""Component micro-benchmarks: deformable attention, Hungarian matching, data pipeline, COCO evaluation."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import Timing, time_interleaved

#: (B, Q, heads, head_dim, levels [(h, w)], points) of the training-time decoder cross-attention at 640x640
DEFORM_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"batch": 2, "queries": 100 * 13, "heads": 16, "head_dim": 16, "levels": [(40, 40)], "points": 2},
    "large": {"batch": 2, "queries": 300 * 13, "heads": 24, "head_dim": 16, "levels": [(80, 80), (20, 20)],
              "points": 4},
}


def deform_inputs(shape: dict[str, Any], device: str = "cpu", grad: bool = False, seed: int = 0):
    """``value (B, S, H, Dh)``, ``locations (B, Q, H, L, P, 2)``, ``weights (B, Q, H, L, P)`` for a shape."""
    g = torch.Generator().manual_seed(seed)
    b, q, h, dh, p = shape["batch"], shape["queries"], shape["heads"], shape["head_dim"], shape["points"]
    levels = shape["levels"]
    s = sum(hh * ww for hh, ww in levels)
    value = torch.randn(b, s, h, dh, generator=g).to(device)
    loc = (torch.rand(b, q, h, len(levels), p, 2, generator=g) * 1.1 - 0.05).to(device)
    w = torch.rand(b, q, h, len(levels) * p, generator=g).softmax(-1).view(b, q, h, len(levels), p).to(device)
    if grad:
        for t in (value, loc, w):
            t.requires_grad_(True)
    return value, levels, loc, w


def hf_ms_deform_attn() -> Callable[..., torch.Tensor] | None:
    """HF transformers' pure-PyTorch deformable attention as ``fn(value, shapes, locations, weights)``."""
    try:
        from transformers.models.lw_detr.modeling_lw_detr import MultiScaleDeformableAttention
    except ImportError:
        return None
    mod = MultiScaleDeformableAttention()

    def fn(value, shapes, loc, w):
        shapes_t = torch.tensor(shapes, device=value.device)
        start = torch.cat((shapes_t.new_zeros(1), (shapes_t[:, 0] * shapes_t[:, 1]).cumsum(0)[:-1]))
        return mod(value, shapes_t, list(shapes), start, loc, w, 64)

    return fn


def bench_deform(shape_name: str, repeats: int, warmup: int, device: str = "cpu", with_hf: bool = True
                 ) -> dict[str, dict[str, Timing]]:
    """Forward and forward+backward time of detkit's (and HF's) deformable attention at one shape."""
    from detkit.ops.ms_deform_attn import ms_deform_attn

    impls: dict[str, Callable[..., torch.Tensor]] = {"detkit": ms_deform_attn}
    hf = hf_ms_deform_attn() if with_hf else None
    if hf is not None:
        impls["HF transformers"] = hf
    shape = DEFORM_SHAPES[shape_name]
    fwd: dict[str, Callable[[], Any]] = {}
    fwd_bwd: dict[str, Callable[[], Any]] = {}
    for name, fn in impls.items():
        v, lv, loc, w = deform_inputs(shape, device, grad=True)
        out_grad = torch.randn(shape["batch"], shape["queries"], shape["heads"] * shape["head_dim"], device=device)

        def forward(fn=fn, v=v, lv=lv, loc=loc, w=w):
            return fn(v, lv, loc, w)

        def forward_backward(fn=fn, v=v, lv=lv, loc=loc, w=w, g=out_grad):
            out = fn(v, lv, loc, w)
            torch.autograd.backward(out, g)
            v.grad = loc.grad = w.grad = None

        fwd[name] = forward
        fwd_bwd[name] = forward_backward
    t_fwd = time_interleaved(fwd, repeats, warmup, device)
    t_fb = time_interleaved(fwd_bwd, repeats, warmup, device)
    res = {name: {"forward": t_fwd[name], "forward+backward": t_fb[name]} for name in impls}
    if device == "cpu":
        # noise-robust supplement: CPU time of the calling thread with one intra-op thread (preemption by other
        # processes does not count)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for name in impls:
                for kind, fn in (("forward cpu-time 1 thread", fwd[name]),
                                 ("forward+backward cpu-time 1 thread", fwd_bwd[name])):
                    fn()
                    t = Timing(kind)
                    for _ in range(repeats):
                        t0 = time.thread_time()
                        fn()
                        t.samples.append(time.thread_time() - t0)
                    res[name][kind] = t
        finally:
            torch.set_num_threads(threads)
    return res


# ----------------------------------------------------------------------------------------------------------------------
def matching_case(batch: int = 8, groups: int = 13, queries: int = 100, objects: int = 20, classes: int = 91,
                  seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, groups * queries, classes, generator=g)
    boxes = torch.cat((torch.rand(batch, groups * queries, 2, generator=g) * 0.8 + 0.1,
                       torch.rand(batch, groups * queries, 2, generator=g) * 0.3 + 0.02), -1)
    targets = [{"labels": torch.randint(0, classes, (objects,), generator=g),
                "boxes": torch.cat((torch.rand(objects, 2, generator=g) * 0.8 + 0.1,
                                    torch.rand(objects, 2, generator=g) * 0.3 + 0.02), -1)} for _ in range(batch)]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


def bench_matching(repeats: int, warmup: int) -> dict[str, Timing]:
    """LW-DETR matching (focal class cost) of 13 groups x 8 images x 100 queries x 20 objects, detkit vs HF."""
    from detkit.models.matchers.hungarian import HungarianMatcher

    outputs, targets = matching_case()
    dk = HungarianMatcher(2.0, 5.0, 2.0, class_cost="focal")
    cands: dict[str, Callable[[], Any]] = {"detkit": lambda: dk(outputs, targets, group_detr=13)}
    try:
        from transformers.loss.loss_lw_detr import LwDetrHungarianMatcher

        hf = LwDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2)
        hf_out = {"logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
        hf_tgt = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        cands["HF transformers"] = lambda: hf(hf_out, hf_tgt, 13)
    except ImportError:
        pass
    res = time_interleaved(cands, repeats, warmup)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # noise-robust supplement, as for the deformable attention
        for name, fn in cands.items():
            t = Timing(name + " (CPU time, 1 thread)")
            for _ in range(repeats):
                t0 = time.thread_time()
                fn()
                t.samples.append(time.thread_time() - t0)
            res[t.name] = t
    finally:
        torch.set_num_threads(threads)
    return res


# ----------------------------------------------------------------------------------------------------------------------
def _write_coco_folder(root: Path, num_images: int, size: tuple[int, int] = (480, 640), seed: int = 0) -> None:
    """A small COCO-format data set of random JPEGs with 10 boxes each (COCO-like image size)."""
    import cv2

    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    images, anns = [], []
    h, w = size
    for i in range(num_images):
        img = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (7, 7), 0)
        for _ in range(10):
            x, y = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
            bw, bh = int(rng.integers(20, min(200, w - x))), int(rng.integers(20, min(200, h - y)))
            cv2.rectangle(img, (x, y), (x + bw, y + bh), tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(rng.integers(1, 81)),
                         "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
        cv2.imwrite(str(root / "train2017" / f"{i:06d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        images.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "height": h, "width": w})
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, 81)]
    (root / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))


def bench_data_pipeline(num_samples: int) -> dict[str, float]:
    """Images per second of one data-loading worker (one thread): JPEG decode + LW-DETR train augmentation +
    normalisation, on a temporary COCO-format folder of 640x480 images with 10 boxes each."""
    import cv2

    from detkit.data.build import build_dataset

    prev_threads, prev_cv = torch.get_num_threads(), cv2.getNumThreads()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "coco"
        _write_coco_folder(root, 16)
        cfg = {"format": "coco", "root": str(root), "label_map": "coco_official"}
        out: dict[str, float] = {}
        torch.set_num_threads(1)
        cv2.setNumThreads(1)
        try:
            for name, tf in (("lwdetr_train", {"type": "lwdetr_train"}), ("lwdetr_val", {"type": "lwdetr_val"})):
                ds = build_dataset(cfg, "train", tf)
                ds[0]
                t0 = time.perf_counter()
                for i in range(num_samples):
                    ds[i % len(ds)]
                out[name] = num_samples / (time.perf_counter() - t0)
        finally:
            torch.set_num_threads(prev_threads)
            cv2.setNumThreads(prev_cv)
    return out


# ----------------------------------------------------------------------------------------------------------------------
def coco_eval_data(num_images: int, dets_per_image: int = 100, gts_per_image: int = 7, seed: int = 0):
    """Synthetic COCO ground truth and detections (half near a GT box, half random), as plain dicts."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for i in range(1, num_images + 1):
        images.append({"id": i, "width": 640, "height": 480})
        gt_boxes = []
        for _ in range(gts_per_image):
            x, y = rng.uniform(0, 560), rng.uniform(0, 400)
            w, h = rng.uniform(8, 640 - x), rng.uniform(8, 480 - y)
            cat = int(rng.integers(1, 81))
            gt_boxes.append((x, y, w, h, cat))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
        for k in range(dets_per_image):
            if k % 2 == 0:
                x, y, w, h, cat = gt_boxes[k // 2 % gts_per_image]
                j = rng.normal(0, 0.1, 4) * [w, h, w, h]
                box = [x + j[0], y + j[1], max(w + j[2], 1.0), max(h + j[3], 1.0)]
            else:
                x, y = rng.uniform(0, 560), rng.uniform(0, 400)
                box, cat = [x, y, rng.uniform(8, 640 - x), rng.uniform(8, 480 - y)], int(rng.integers(1, 81))
            dets.append({"image_id": i, "category_id": cat, "bbox": [float(v) for v in box],
                         "score": float(rng.uniform())})
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, 81)]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def _timed_coco_eval(coco_gt: Any, evaluator: type, dets: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds of loadRes + evaluate + accumulate + summarize with one library's COCO API (the ground truth index is
    built before the clock starts), and the AP it reports."""
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        ev = evaluator(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"seconds": time.perf_counter() - t0, "AP": float(ev.stats[0])}


def bench_coco_eval(num_images: int) -> dict[str, Any]:
    """Seconds to load detections, evaluate, accumulate and summarise (bbox) with pycocotools and faster-coco-eval;
    the AP of both must agree."""

    gt, dets = coco_eval_data(num_images)
    out: dict[str, Any] = {}

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    coco.createIndex()
    out["pycocotools"] = _timed_coco_eval(coco, COCOeval, dets)
    try:
        from faster_coco_eval import COCO as FCOCO
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        out["faster-coco-eval"] = None
        return out
    out["faster-coco-eval"] = _timed_coco_eval(FCOCO(copy.deepcopy(gt)), COCOeval_faster, dets)
    return out
