"""``detkit eval``: COCO metrics of a checkpoint plus the tables a practitioner looks at next.

The report (:func:`build_report`) holds

- the 12 standard COCO numbers (``COCOeval`` from pycocotools, or the optional ``faster-coco-eval`` backend, which
  gives the same numbers faster);
- per class: AP, AP50, AP75, AR100 (from ``COCOeval``'s precision / recall arrays) and the score threshold with the
  best F1 at IoU 0.5 with its precision and recall (exact, from a COCO-style greedy matching of the detections);
- a confusion matrix with a background row and column: detections scoring at least ``conf_threshold`` are matched
  one-to-one to ground truth of any class at IoU >= ``iou_threshold`` (highest IoU first). Rows are the true
  class (last row: background, i.e. false detections), columns the predicted class (last column: background, i.e.
  missed objects). Detections on crowd regions are left out, as COCO does.

``detkit eval`` (:mod:`detkit.engine.eval_cli`) prints it as tables (:func:`format_report`), writes it as JSON and
draws the PR curves (:func:`plot_pr_curves`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detkit.engine.evaluator import COCO_METRICS, coco_evaluate
from detkit.errors import ConfigError, DetkitError

log = logging.getLogger("detkit.eval")

BACKENDS = ("pycocotools", "faster-coco-eval")


class MissingDependencyError(DetkitError):
    """An optional package needed by the chosen option is not installed."""


# ---------------------------------------------------------------------------------------------------------------------
# COCOeval with either backend
# ---------------------------------------------------------------------------------------------------------------------


def run_cocoeval(coco_gt: Any, detections: list[dict[str, Any]], backend: str = "pycocotools"
                 ) -> tuple[dict[str, float], Any]:
    """The 12 COCO bbox numbers (0-1, ``-1`` of empty area ranges shown as 0) and the evaluator object, whose
    ``eval["precision"]`` ``(T, R, K, A, M)`` and ``eval["recall"]`` ``(T, K, A, M)`` hold the curves."""
    if backend == "pycocotools":
        return coco_evaluate(coco_gt, detections)
    if backend != "faster-coco-eval":
        raise ConfigError(f"unknown eval backend {backend!r} (choose from {', '.join(BACKENDS)})")
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError as e:
        raise MissingDependencyError(
            "--backend faster-coco-eval needs the faster-coco-eval package: pip install 'detkit[fast-eval]' "
            "(or pip install faster-coco-eval)") from e
    if not detections or not coco_gt.getAnnIds():
        return {k: 0.0 for k in COCO_METRICS}, None
    gt = COCO()
    gt.dataset = copy.deepcopy(coco_gt.dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes([dict(d) for d in detections])
        ev = COCOeval_faster(gt, dt, iouType="bbox", print_function=lambda *a, **k: None)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: float(max(v, 0.0)) for k, v in zip(COCO_METRICS, np.asarray(ev.stats)[:12].tolist())}
    return stats, ev


def per_class_coco(ev: Any, cat_ids: Sequence[int]) -> dict[int, dict[str, float | None]]:
    """``{category id: {AP, AP50, AP75, AR100}}`` from a COCOeval's accumulated arrays (area all, 100 detections);
    ``None`` for a class without ground truth."""
    out: dict[int, dict[str, float | None]] = {}
    if ev is None:
        return {int(c): {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AR100": 0.0} for c in cat_ids}
    params = ev.params
    precision, recall = np.asarray(ev.eval["precision"]), np.asarray(ev.eval["recall"])
    area = list(params.areaRngLbl).index("all")
    mdet = list(params.maxDets).index(100) if 100 in params.maxDets else len(params.maxDets) - 1
    ious = np.asarray(params.iouThrs)
    t50, t75 = int(np.argmin(np.abs(ious - 0.5))), int(np.argmin(np.abs(ious - 0.75)))
    index = {int(c): k for k, c in enumerate(params.catIds)}

    def mean(a: np.ndarray) -> float | None:
        a = a[a > -1]
        return float(a.mean()) if a.size else None

    for c in cat_ids:
        k = index.get(int(c))
        if k is None:
            out[int(c)] = {"AP": None, "AP50": None, "AP75": None, "AR100": None}
            continue
        p = precision[:, :, k, area, mdet]
        out[int(c)] = {"AP": mean(p), "AP50": mean(p[t50]), "AP75": mean(p[t75]),
                       "AR100": mean(recall[:, k, area, mdet])}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Matching: best-F1 thresholds and the confusion matrix
# ---------------------------------------------------------------------------------------------------------------------


def _xywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    b = np.asarray(b, np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def box_iou(a: np.ndarray, b: np.ndarray, crowd: np.ndarray | None = None) -> np.ndarray:
    """IoU of xyxy boxes ``a (N, 4)`` and ``b (M, 4)`` -> ``(N, M)``; for columns where ``crowd`` is True the
    denominator is the area of ``a`` (COCO's rule for crowd regions)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    if crowd is not None and crowd.any():
        union = np.where(crowd[None, :], area_a[:, None], union)
    return inter / np.maximum(union, 1e-12)


def _group(coco_gt: Any, detections: Sequence[Mapping[str, Any]]) -> tuple[dict, dict]:
    gts: dict[int, list[dict[str, Any]]] = {int(i): [] for i in coco_gt.getImgIds()}
    for ann in coco_gt.loadAnns(coco_gt.getAnnIds()):
        gts.setdefault(int(ann["image_id"]), []).append(ann)
    dts: dict[int, list[Mapping[str, Any]]] = {}
    for d in detections:
        dts.setdefault(int(d["image_id"]), []).append(d)
    return gts, dts


def best_f1(coco_gt: Any, detections: Sequence[Mapping[str, Any]], cat_ids: Sequence[int],
            iou_threshold: float = 0.5, max_dets: int = 100) -> dict[int, dict[str, Any]]:
    """Per category id: the score threshold with the highest F1 at IoU ``iou_threshold`` and its precision,
    recall and F1, plus ``num_gt``/``num_det``. Matching follows COCO (per image and class, detections in score
    order take the unmatched ground truth of highest IoU; matches to crowd regions are ignored; at most ``max_dets``
    detections per image)."""
    gts, dts = _group(coco_gt, detections)
    scores: dict[int, list[float]] = {int(c): [] for c in cat_ids}
    hits: dict[int, list[bool]] = {int(c): [] for c in cat_ids}
    num_gt = {int(c): 0 for c in cat_ids}
    for image_id in set(gts) | set(dts):
        image_dts = sorted(dts.get(image_id, []), key=lambda d: -float(d["score"]))
        image_gts = gts.get(image_id, [])
        for c in cat_ids:
            c = int(c)
            # as COCOeval: real objects before crowd regions, at most max_dets detections per image and class
            g = sorted((a for a in image_gts if int(a["category_id"]) == c), key=lambda a: bool(a.get("iscrowd", 0)))
            crowd = np.array([bool(a.get("iscrowd", 0)) for a in g], bool)
            num_gt[c] += int((~crowd).sum())
            d = [x for x in image_dts if int(x["category_id"]) == c][:max_dets]
            if not d:
                continue
            iou = box_iou(_xywh_to_xyxy([x["bbox"] for x in d]), _xywh_to_xyxy([a["bbox"] for a in g]), crowd)
            taken = np.zeros(len(g), bool)
            for i, det in enumerate(d):  # already in score order
                best, best_j = min(iou_threshold, 1 - 1e-10), -1
                for j in range(len(g)):
                    if taken[j] and not crowd[j]:
                        continue
                    if best_j >= 0 and not crowd[best_j] and crowd[j]:
                        break  # a real match is preferred over a crowd region
                    if iou[i, j] < best:
                        continue
                    best, best_j = iou[i, j], j
                if best_j >= 0 and crowd[best_j]:
                    continue  # on a crowd region: neither true nor false
                if best_j >= 0:
                    taken[best_j] = True
                scores[c].append(float(det["score"]))
                hits[c].append(best_j >= 0)
    out: dict[int, dict[str, Any]] = {}
    for c in map(int, cat_ids):
        s, h = np.asarray(scores[c]), np.asarray(hits[c], bool)
        entry: dict[str, Any] = {"num_gt": num_gt[c], "num_det": int(len(s)), "threshold": None, "precision": 0.0,
                                 "recall": 0.0, "f1": 0.0}
        if len(s) and num_gt[c]:
            order = np.argsort(-s, kind="mergesort")
            s, h = s[order], h[order]
            tp = np.cumsum(h)
            fp = np.cumsum(~h)
            # only the last detection of a run of equal scores is a reachable operating point
            last = np.r_[s[1:] != s[:-1], True]
            precision = (tp / np.maximum(tp + fp, 1))[last]
            recall = (tp / num_gt[c])[last]
            f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
            k = int(np.argmax(f1))
            if f1[k] > 0:
                entry.update(threshold=float(s[last][k]), precision=float(precision[k]), recall=float(recall[k]),
                             f1=float(f1[k]))
        out[c] = entry
    return out


def confusion_matrix(coco_gt: Any, detections: Sequence[Mapping[str, Any]], cat_ids: Sequence[int],
                     conf_threshold: float = 0.5, iou_threshold: float = 0.5) -> np.ndarray:
    """``(C + 1, C + 1)`` counts, rows = true class, columns = predicted class, index ``C`` = background
    (see the module docstring); classes in the order of ``cat_ids``."""
    index = {int(c): k for k, c in enumerate(cat_ids)}
    n = len(cat_ids)
    matrix = np.zeros((n + 1, n + 1), np.int64)
    gts, dts = _group(coco_gt, detections)
    for image_id in set(gts) | set(dts):
        image_gts = [a for a in gts.get(image_id, []) if int(a["category_id"]) in index]
        real = [a for a in image_gts if not a.get("iscrowd", 0)]
        crowd = [a for a in image_gts if a.get("iscrowd", 0)]
        d = [x for x in dts.get(image_id, []) if float(x["score"]) >= conf_threshold and int(x["category_id"]) in index]
        d_boxes = _xywh_to_xyxy([x["bbox"] for x in d])
        iou = box_iou(d_boxes, _xywh_to_xyxy([a["bbox"] for a in real]))
        pairs = np.argwhere(iou >= iou_threshold)
        pairs = pairs[np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="mergesort")] if len(pairs) else pairs
        used_d, used_g = set(), set()
        for i, j in pairs.tolist():
            if i in used_d or j in used_g:
                continue
            used_d.add(i)
            used_g.add(j)
            matrix[index[int(real[j]["category_id"])], index[int(d[i]["category_id"])]] += 1
        for j, a in enumerate(real):
            if j not in used_g:
                matrix[index[int(a["category_id"])], n] += 1
        on_crowd = np.zeros(len(d), bool)
        if crowd and len(d):
            c_iou = box_iou(d_boxes, _xywh_to_xyxy([a["bbox"] for a in crowd]), np.ones(len(crowd), bool))
            on_crowd = (c_iou >= iou_threshold).any(1)
        for i, x in enumerate(d):
            if i not in used_d and not on_crowd[i]:
                matrix[n, index[int(x["category_id"])]] += 1
    return matrix


# ---------------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------------


def build_report(coco_gt: Any, detections: list[dict[str, Any]], classes: Sequence[str] | None = None,
                 backend: str = "pycocotools", conf_threshold: float = 0.5, iou_threshold: float = 0.5
                 ) -> tuple[dict[str, Any], Any]:
    """Everything ``detkit eval`` shows, as a JSON-ready dict, and the COCOeval object (for the PR curves).

    :param classes: names by category order of ``coco_gt`` (default: the category names of ``coco_gt``).
    """
    t0 = time.perf_counter()
    metrics, ev = run_cocoeval(coco_gt, detections, backend)
    eval_time = time.perf_counter() - t0
    cats = sorted(coco_gt.loadCats(coco_gt.getCatIds()), key=lambda c: c["id"])
    cat_ids = [int(c["id"]) for c in cats]
    names = [str(c["name"]) for c in cats] if classes is None else [str(n) for n in classes]
    if len(names) != len(cat_ids):
        names = [str(c["name"]) for c in cats]
    coco_cls = per_class_coco(ev, cat_ids)
    f1 = best_f1(coco_gt, detections, cat_ids, iou_threshold)
    matrix = confusion_matrix(coco_gt, detections, cat_ids, conf_threshold, iou_threshold)
    per_class = []
    for c, name in zip(cat_ids, names):
        row: dict[str, Any] = {"class": name, "category_id": c, **coco_cls[c]}
        row["num_gt"] = f1[c]["num_gt"]
        row["num_det"] = f1[c]["num_det"]
        row["best_f1"] = {k: f1[c][k] for k in ("threshold", "precision", "recall", "f1")}
        per_class.append(row)
    report = {
        "metrics": metrics,
        "backend": backend,
        "coco_eval_time_s": round(eval_time, 4),
        "num_images": len(coco_gt.getImgIds()),
        "num_detections": len(detections),
        "per_class": per_class,
        "best_f1_iou": iou_threshold,
        "confusion_matrix": {"labels": [*names, "background"], "matrix": matrix.tolist(),
                             "rows": "true class", "columns": "predicted class",
                             "score_threshold": conf_threshold, "iou_threshold": iou_threshold},
    }
    return report, ev


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(rows: list[list[str]], right_from: int = 1) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i < right_from else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(report: Mapping[str, Any], max_matrix_classes: int = 20) -> str:
    """The report as text tables: the 12 numbers, the per-class table and (small class counts) the matrix."""
    m = report["metrics"]
    parts = ["COCO bbox metrics (" + report["backend"] + f", {report['num_images']} images, "
             f"{report['num_detections']} detections)",
             _table([list(COCO_METRICS), [f"{m[k]:.4f}" for k in COCO_METRICS]], right_from=0), ""]
    rows = [["class", "gt", "AP", "AP50", "AP75", "AR100", "best-F1 thr", "P", "R", "F1"]]
    for r in report["per_class"]:
        b = r["best_f1"]
        rows.append([r["class"], str(r["num_gt"]), _fmt(r["AP"]), _fmt(r["AP50"]), _fmt(r["AP75"]), _fmt(r["AR100"]),
                     _fmt(b["threshold"]), _fmt(b["precision"]), _fmt(b["recall"]), _fmt(b["f1"])])
    parts += [f"per class (best F1 at IoU {report['best_f1_iou']})", _table(rows), ""]
    cm = report["confusion_matrix"]
    labels = cm["labels"]
    if len(labels) - 1 <= max_matrix_classes:
        short = [lab if len(lab) <= 10 else lab[:9] + "~" for lab in labels]
        mrows = [["true \\ pred", *short]]
        mrows += [[short[i], *[str(v) for v in row]] for i, row in enumerate(cm["matrix"])]
        parts += [f"confusion matrix (score >= {cm['score_threshold']}, IoU >= {cm['iou_threshold']}; "
                  "background row = false detections, column = missed objects)", _table(mrows)]
    else:
        parts.append(f"confusion matrix: {len(labels) - 1} classes, see the JSON report")
    return "\n".join(parts)


def plot_pr_curves(ev: Any, report: Mapping[str, Any], path: str | os.PathLike[str], max_classes: int = 20) -> Path:
    """PR curves at IoU 0.5 (COCO's interpolated precision at 101 recall points): one line per class (the
    ``max_classes`` with the most ground truth) and the mean over classes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 5.5), dpi=100)
    if ev is not None:
        params = ev.params
        precision = np.asarray(ev.eval["precision"])
        rec = np.asarray(params.recThrs)
        t50 = int(np.argmin(np.abs(np.asarray(params.iouThrs) - 0.5)))
        area = list(params.areaRngLbl).index("all")
        index = {int(c): k for k, c in enumerate(params.catIds)}
        rows = sorted(report["per_class"], key=lambda r: -r["num_gt"])
        curves = []
        for r in rows:
            k = index.get(int(r["category_id"]))
            if k is None or r["num_gt"] == 0:
                continue
            p = precision[t50, :, k, area, -1]
            curves.append(np.where(p > -1, p, 0.0))
            if len(curves) <= max_classes:
                ax.plot(rec, curves[-1], lw=1, label=f"{r['class']} {_fmt(r['AP50'])}")
        if curves:
            ax.plot(rec, np.mean(curves, 0), lw=3, color="k", label=f"all classes {report['metrics']['AP50']:.3f}")
    else:
        ax.text(0.5, 0.5, "no detections", ha="center", va="center")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title="precision-recall at IoU 0.5 (legend: AP50)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
