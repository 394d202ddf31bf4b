"""Tiled (sliced) prediction: large images cut into overlapping tiles, each predicted at the model's size.

A detector trained on 448-640 px inputs shrinks a 4000 px aerial or microscopy image sixfold when it predicts it
whole, and small objects vanish. :func:`predict_tiled` instead cuts the image into ``tile x tile`` windows that
overlap by the fraction ``overlap`` (the windows are spread evenly, so the overlap is at least that), predicts the
windows in batches, maps the boxes back to the full image and merges them across the seams
(:func:`merge_tile_detections`):

- a detection is *cut* on a side when it touches a window edge that is not an image edge (the object may go on in
  the next window);
- two detections of one class from different windows are the same object when their parts inside the region the
  two windows share match (IoU >= ``match_iou``): both windows saw the same pixels there;
- the detections of one object (at most one per window) become one: the best-scoring *complete* detection when a
  window saw the object whole, else the union of the cut parts (an object larger than the overlap is cut in every
  window that sees it). The score is the best of the parts.

Detections of one window are never merged with each other (that is the model's own business, as without tiles), so
an image made of known tiles scores the same AP tiled as its tiles do alone.

``Detector.predict(..., tile=640, overlap=0.2)``, ``detkit predict --tile 640 --overlap 0.2`` and
``detkit eval --tile 640`` use it; ``tile="auto"`` tiles only images much larger than the model's input
(:func:`resolve_tile`). ONNX files run the same way (``detkit predict --runtime onnxruntime``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detkit.errors import ConfigError

#: ``tile="auto"`` tiles an image whose longer side exceeds this many times the model's input side
AUTO_TILE_FACTOR = 2.0
DEFAULT_OVERLAP = 0.2

#: a function that predicts a list of RGB arrays and returns, per array, ``(boxes (K, 4) xyxy in that array's
#: pixels, scores (K,), labels (K,))`` as numpy arrays
PredictArrays = Callable[[list[np.ndarray]], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]


@dataclass(frozen=True)
class TileDetections:
    """Detections of every window of one image, before merging: ``boxes (N, 4)`` xyxy in full-image pixels,
    ``scores (N,)``, ``labels (N,)``, ``window (N,)`` (index into ``windows``, each ``(x0, y0, x1, y1)``)."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    window: Tensor
    windows: list[tuple[int, int, int, int]]
    image_size: tuple[int, int]  # (h, w)


def tile_starts(length: int, size: int, overlap: float) -> list[int]:
    """Start offsets of windows of ``size`` covering ``[0, length)`` with at least ``overlap`` (a fraction of
    ``size``) between neighbours, spread evenly, the last window ending at ``length``."""
    if length <= size:
        return [0]
    stride = max(1.0, size * (1.0 - overlap))
    n = math.ceil((length - size) / stride) + 1
    return [round(i * (length - size) / (n - 1)) for i in range(n)]


def tile_windows(height: int, width: int, tile: int, overlap: float = DEFAULT_OVERLAP
                 ) -> list[tuple[int, int, int, int]]:
    """Windows ``(x0, y0, x1, y1)`` of ``tile x tile`` pixels (smaller only where the image is), row by row."""
    check_tile_options(tile, overlap)
    th, tw = min(tile, height), min(tile, width)
    return [(x, y, x + tw, y + th) for y in tile_starts(height, th, overlap) for x in tile_starts(width, tw, overlap)]


def check_tile_options(tile: int, overlap: float) -> None:
    """A :class:`ConfigError` naming the bad value."""
    if not isinstance(tile, (int, np.integer)) or tile < 16:
        raise ConfigError(f"tile size must be an integer >= 16 pixels, got {tile!r}")
    if not 0.0 <= float(overlap) < 0.9 or math.isnan(float(overlap)):
        raise ConfigError(f"tile overlap must be a fraction within [0, 0.9), got {overlap!r}")


def model_input_side(val_transforms: Mapping[str, Any] | None) -> int | None:
    """The longer side of the images the model sees, from its evaluation transform (``lwdetr_val`` size,
    ``square_resize`` / ``random_resize`` first size, ``detr_val`` max size), or None when unknown."""
    node = dict(val_transforms or {})
    kind = node.get("type")
    if kind == "lwdetr_val":
        return int(node.get("size", 640))
    if kind == "detr_val":
        return int(node.get("max_size", 1333))
    if kind in ("square_resize", "random_resize") and node.get("sizes"):
        return int(max(node["sizes"]))
    return None


def resolve_tile(tile: int | str | None, image_size: tuple[int, int], input_side: int | None) -> int | None:
    """The tile size to use for an image of ``image_size`` (h, w): ``tile`` itself when it is a number (0 or None:
    no tiling); for ``"auto"``, the model's input side when the image's longer side exceeds
    :data:`AUTO_TILE_FACTOR` times it (each tile is then seen at its own resolution), else None."""
    if tile is None or tile == 0 or tile == "none":
        return None
    if tile == "auto":
        if not input_side or max(image_size) <= AUTO_TILE_FACTOR * input_side:
            return None
        return int(input_side)
    if isinstance(tile, str):
        try:
            tile = int(tile)
        except ValueError:
            raise ConfigError(f"tile must be a size in pixels, 0 (off) or 'auto', got {tile!r}") from None
        return resolve_tile(tile, image_size, input_side)
    return int(tile)


def parse_tile(value: str) -> int | str:
    """``--tile`` of the command line: ``auto``, ``0`` / ``none`` (off) or a size in pixels."""
    if value in ("auto", "none"):
        return value
    try:
        size = int(value)
    except ValueError:
        raise ConfigError(f"--tile must be a size in pixels, 0 / none (off) or auto, got {value!r}") from None
    if size != 0:
        check_tile_options(size, 0.0)
    return size


def tile_detections(predict_arrays: PredictArrays, image: np.ndarray, tile: int, overlap: float = DEFAULT_OVERLAP,
                    batch_size: int = 4, whole_image: bool = False) -> TileDetections:
    """Predict every window of ``image (H, W, 3)`` (``batch_size`` windows per call) and map the boxes to the image;
    with ``whole_image`` also the whole image, as one more window."""
    h, w = image.shape[:2]
    windows = tile_windows(h, w, tile, overlap)
    if whole_image and windows != [(0, 0, w, h)]:
        windows.append((0, 0, w, h))
    boxes, scores, labels, index = [], [], [], []
    for start in range(0, len(windows), max(1, batch_size)):
        chunk = windows[start:start + max(1, batch_size)]
        crops = [np.ascontiguousarray(image[y0:y1, x0:x1]) for x0, y0, x1, y1 in chunk]
        for k, ((x0, y0, _, _), (b, s, lab)) in enumerate(zip(chunk, predict_arrays(crops))):
            b = torch.as_tensor(np.asarray(b, np.float32)).reshape(-1, 4) + torch.tensor([x0, y0, x0, y0],
                                                                                        dtype=torch.float32)
            boxes.append(b)
            scores.append(torch.as_tensor(np.asarray(s, np.float32)).reshape(-1))
            labels.append(torch.as_tensor(np.asarray(lab, np.int64)).reshape(-1))
            index.append(torch.full((len(b),), start + k, dtype=torch.int64))
    return TileDetections(torch.cat(boxes), torch.cat(scores), torch.cat(labels), torch.cat(index), windows, (h, w))


def _cut_sides(boxes: Tensor, windows: Tensor, image_size: tuple[int, int], margin: float) -> Tensor:
    """``(N, 4)`` bool: box side (x1, y1, x2, y2) touches an inner window edge (within ``margin`` px)."""
    h, w = image_size
    inner = torch.stack([windows[:, 0] > 0, windows[:, 1] > 0, windows[:, 2] < w, windows[:, 3] < h], 1)
    near = torch.stack([boxes[:, 0] <= windows[:, 0] + margin, boxes[:, 1] <= windows[:, 1] + margin,
                        boxes[:, 2] >= windows[:, 2] - margin, boxes[:, 3] >= windows[:, 3] - margin], 1)
    return inner & near


def _clip(boxes: Tensor, region: Tensor) -> Tensor:
    lo = torch.maximum(boxes[:, :2], region[:2])
    hi = torch.minimum(boxes[:, 2:], region[2:])
    return torch.cat([lo, torch.maximum(hi, lo)], 1)


def _area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _pair_ious(a: Tensor, b: Tensor) -> Tensor:
    """IoU ``(N, M)`` of xyxy boxes."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = _area(torch.cat([lt, rb], -1))
    union = _area(a)[:, None] + _area(b)[None, :] - inter
    return inter / union.clamp(min=1e-9)


def merge_tile_detections(dets: TileDetections, match_iou: float = 0.5, edge_margin: float | None = None
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """Merge detections across window seams (see the module docstring) -> ``boxes (K, 4)``, ``scores (K,)``,
    ``labels (K,)``, best score first.

    :param match_iou: IoU, inside the region two windows share, at which two detections are one object.
    :param edge_margin: pixels within which a box side counts as touching a window edge (default 1% of the
        window side, at least 1 px).
    """
    n = len(dets.scores)
    if n == 0:
        return dets.boxes, dets.scores, dets.labels
    windows = torch.tensor(dets.windows, dtype=torch.float32)
    if edge_margin is None:
        edge_margin = max(1.0, 0.01 * float((windows[:, 2:] - windows[:, :2]).max()))
    cut = _cut_sides(dets.boxes, windows[dets.window], dets.image_size, edge_margin).any(1)
    # candidate pairs: same class, windows that overlap, parts in the shared region that match
    neighbours: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    members = [torch.nonzero(dets.window == k).flatten() for k in range(len(dets.windows))]
    for a in range(len(dets.windows)):
        for b in range(a + 1, len(dets.windows)):
            region = torch.cat([torch.maximum(windows[a, :2], windows[b, :2]),
                                torch.minimum(windows[a, 2:], windows[b, 2:])])
            if (region[2:] <= region[:2]).any() or not len(members[a]) or not len(members[b]):
                continue
            ia, ib = members[a], members[b]
            pa, pb = _clip(dets.boxes[ia], region), _clip(dets.boxes[ib], region)
            iou = _pair_ious(pa, pb)
            iou[(_area(pa) <= 0)[:, None] | (_area(pb) <= 0)[None, :]] = 0
            iou[dets.labels[ia][:, None] != dets.labels[ib][None, :]] = 0
            # a cluster holds one detection per window: only each detection's best match in the other window counts
            best_b, best_a = iou.argmax(1), iou.argmax(0)
            pairs = {(i, int(best_b[i])) for i in range(len(ia))} | {(int(best_a[j]), j) for j in range(len(ib))}
            for i, j in pairs:
                value = float(iou[i, j])
                if value >= match_iou:
                    neighbours[int(ia[i])].append((int(ib[j]), value))
                    neighbours[int(ib[j])].append((int(ia[i]), value))
    # clusters in score order, at most one detection per window in a cluster: a detection joins the clusters of
    # the detections it matches (merging them when their windows do not repeat), or starts one
    order = torch.argsort(dets.scores, descending=True, stable=True).tolist()
    cluster_of = [-1] * n
    clusters: dict[int, list[int]] = {}
    cluster_windows: dict[int, set[int]] = {}
    for i in order:
        window = int(dets.window[i])
        best: dict[int, float] = {}
        for j, value in neighbours[i]:
            c = cluster_of[j]
            if c >= 0 and window not in cluster_windows[c]:
                best[c] = max(best.get(c, 0.0), value)
        target, taken = i, {window}
        clusters[target], cluster_windows[target] = [], set()
        for c in sorted(best, key=lambda c: -best[c]):
            if taken.isdisjoint(cluster_windows[c]):
                taken |= cluster_windows[c]
                for j in clusters.pop(c):
                    cluster_of[j] = target
                    clusters[target].append(j)
                del cluster_windows[c]
        clusters[target].append(i)
        cluster_windows[target] = taken
        cluster_of[i] = target
    boxes, scores, labels = [], [], []
    for group in clusters.values():
        group = sorted(group, key=lambda i: -float(dets.scores[i]))
        complete = [i for i in group if not bool(cut[i])]
        if complete:
            box = dets.boxes[complete[0]]
        else:
            part = dets.boxes[group]
            box = torch.cat([part[:, :2].min(0).values, part[:, 2:].max(0).values])
        boxes.append(box)
        scores.append(dets.scores[group[0]])
        labels.append(dets.labels[group[0]])
    boxes_t, scores_t, labels_t = torch.stack(boxes), torch.stack(scores), torch.stack(labels)
    keep = torch.argsort(scores_t, descending=True, stable=True)
    return boxes_t[keep], scores_t[keep], labels_t[keep]


def predict_tiled(predict_arrays: PredictArrays, image: np.ndarray, tile: int, overlap: float = DEFAULT_OVERLAP,
                  batch_size: int = 4, whole_image: bool = False, match_iou: float = 0.5
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tiled prediction of one RGB ``image (H, W, 3)``: ``(boxes (K, 4) xyxy, scores (K,), labels (K,))`` in its
    pixels, best first. ``predict_arrays`` predicts a list of crops (see :data:`PredictArrays`)."""
    dets = tile_detections(predict_arrays, image, tile, overlap, batch_size, whole_image)
    boxes, scores, labels = merge_tile_detections(dets, match_iou)
    return boxes.numpy(), scores.numpy(), labels.numpy()


def predict_dataset_tiled(detector: Any, dataset: Any, tile: int | str, overlap: float = DEFAULT_OVERLAP,
                          whole_image: bool = False, rank: int = 0, world_size: int = 1) -> list[dict[str, Any]]:
    """COCO-format detections of ``detector`` (a :class:`detkit.predict.api.Detector`) on every image of ``dataset``
    (this rank's share ``rank::world_size``), each image predicted in tiles from its original pixels."""
    cat_ids: Sequence[int] = list(dataset.cat_ids)
    results: list[dict[str, Any]] = []
    for index in range(rank, len(dataset), world_size):
        image, _, _ = dataset.read(index)
        pred = detector.predict(image, threshold=0.0, tile=tile, overlap=overlap, whole_image=whole_image)
        image_id = int(dataset.image_info(index)["id"])
        for box, score, label in zip(pred.boxes.tolist(), pred.scores.tolist(), pred.labels.tolist()):
            if score > 0 and 0 <= label < len(cat_ids):  # as the whole-image evaluator keeps them
                results.append({"image_id": image_id, "category_id": int(cat_ids[label]),
                                "bbox": [round(box[0], 3), round(box[1], 3), round(max(box[2] - box[0], 0.0), 3),
                                         round(max(box[3] - box[1], 0.0), 3)], "score": round(float(score), 5)})
    return results
