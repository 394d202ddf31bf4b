"""A tiny detector and data set that follow the project contracts, for fast engine tests.

Import as ``support.tiny_detector`` with ``tests/`` on ``sys.path`` (the engine tests do that, and pass the module
in ``plugins.imports`` so that the registered ``tiny_test`` detector exists in subprocesses too).

- ``tiny_test`` detector: a 3-layer conv stem (stride 8), one cross-attention layer from learned queries to the
  feature map, a class head ``class_embed`` (num_classes + 1, the last being no-object, as DETR) with dropout in
  front (so random streams matter), a box MLP with sigmoid. Loss: Hungarian matching (scipy) on
  ``-p(class) + 5 L1 + 2 (1 - GIoU)``, cross-entropy with no-object weight 0.1, L1 and GIoU, all summed and
  normalised by the number of boxes all-reduced over ranks. ``nan_after``/``nan_count`` make the loss NaN on chosen training calls.
- :class:`TinyShapes`: coloured squares on noise, deterministic from ``seed + index``, with a random horizontal
  flip drawn from python's global ``random`` (so per-sample seeding is exercised), ``classes``, ``cat_ids``,
  ``coco_gt()`` and ``collate_fn``.
"""

from __future__ import annotations

import contextlib
import io
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch.utils.data import Dataset
from torchvision.ops import box_convert, generalized_box_iou

from detkit.registry import DETECTORS

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
COLOURS = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40), (200, 60, 200)]


def _xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


class TinyCriterion(nn.Module):
    def __init__(self, num_classes: int, eos_coef: float = 0.1, nan_after: int = -1, nan_count: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        weight = torch.ones(num_classes + 1)
        weight[-1] = eos_coef
        self.register_buffer("empty_weight", weight, persistent=False)
        self.nan_after = nan_after
        self.nan_count = nan_count
        self.calls = 0

    @torch.no_grad()
    def match(self, logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[Mapping[str, Any]]):
        out = []
        for b, t in enumerate(targets):
            if len(t["labels"]) == 0:
                out.append((torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)))
                continue
            prob = logits[b].softmax(-1)[:, t["labels"]]
            cost = -prob + 5 * torch.cdist(boxes[b], t["boxes"], p=1) \
                - 2 * generalized_box_iou(_xyxy(boxes[b]), _xyxy(t["boxes"]))
            # NaN / Inf outputs (a diverging step, which the trainer skips) must not crash the assignment
            q, g = linear_sum_assignment(torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=1e8).cpu().numpy())
            out.append((torch.as_tensor(q, dtype=torch.long), torch.as_tensor(g, dtype=torch.long)))
        return out

    def single(self, logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[Mapping[str, Any]],
               num_boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        idx = self.match(logits, boxes, targets)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=logits.device)
        src_boxes, tgt_boxes = [], []
        for b, (q, g) in enumerate(idx):
            target_classes[b, q.to(logits.device)] = targets[b]["labels"][g]
            src_boxes.append(boxes[b, q])
            tgt_boxes.append(targets[b]["boxes"][g])
        # summed and divided by the all-reduced box count (not a per-process mean), so that N ranks with batch B
        # give exactly the gradient of one process with batch N*B
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight, reduction="sum") \
            / num_boxes / 4
        src = torch.cat(src_boxes)
        tgt = torch.cat(tgt_boxes)
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        loss_giou = (1 - torch.diag(generalized_box_iou(_xyxy(src), _xyxy(tgt)))).sum() / num_boxes
        return {"loss_ce": loss_ce, "loss_bbox": 5 * loss_bbox, "loss_giou": 2 * loss_giou}

    def forward(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        n = sum(len(t["labels"]) for t in targets)
        num_boxes = torch.as_tensor([float(n)], device=outputs["pred_logits"].device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num_boxes)
            num_boxes = num_boxes / torch.distributed.get_world_size()
        num_boxes = num_boxes.clamp(min=1).squeeze(0)
        losses = self.single(outputs["pred_logits"], outputs["pred_boxes"], targets, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            for k, v in self.single(aux["pred_logits"], aux["pred_boxes"], targets, num_boxes).items():
                losses[f"{k}_{i}"] = v
        total = sum(losses.values())
        if self.training:
            self.calls += 1
            if self.nan_after >= 0 and self.nan_after < self.calls <= self.nan_after + self.nan_count:
                total = total * float("nan")
        losses["loss"] = total
        losses["class_error"] = torch.tensor(0.0)
        return losses


class SoftmaxPost(nn.Module):
    def forward(self, outputs: Mapping[str, torch.Tensor], orig_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        prob = outputs["pred_logits"].softmax(-1)[..., :-1]
        scores, labels = prob.max(-1)
        h, w = orig_sizes.unbind(1)
        scale = torch.stack([w, h, w, h], dim=1).unsqueeze(1).float()
        boxes = _xyxy(outputs["pred_boxes"]) * scale
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]


class TinyDetector(nn.Module):
    """Conv stem + one query cross-attention layer + heads. ``forward(images (B,3,H,W), mask (B,H,W))``."""

    #: the optimizer groups of DETR (detkit.engine.optim): the conv stem at ``train.lr_backbone``
    lr_policy = "backbone_lr"
    lr_parts = {"backbone": "backbone"}

    def __init__(self, num_classes: int = 3, hidden_dim: int = 32, num_queries: int = 8, dropout: float = 0.1,
                 nan_after: int = -1, nan_count: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, hidden_dim, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.pos = nn.Parameter(torch.randn(1, hidden_dim, 8, 8) * 0.02)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.attn = nn.MultiheadAttention(hidden_dim, 4, batch_first=True)
        self.norm = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 4))
        self.criterion = TinyCriterion(num_classes, nan_after=nan_after, nan_count=nan_count)
        self.postprocessor = SoftmaxPost()

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        feat = self.backbone(images)
        b, c, h, w = feat.shape
        feat = feat + F.interpolate(self.pos, size=(h, w), mode="bilinear", align_corners=False)
        small = F.interpolate(mask[:, None].float(), size=(h, w)).bool()[:, 0].flatten(1)
        memory = feat.flatten(2).transpose(1, 2)
        q = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        hs1 = self.norm(q + self.attn(q, memory, memory, key_padding_mask=small)[0])
        hs2 = self.norm(hs1 + self.attn(hs1, memory, memory, key_padding_mask=small)[0])
        outs = [{"pred_logits": self.class_embed(self.dropout(hs)), "pred_boxes": self.bbox_embed(hs).sigmoid()}
                for hs in (hs1, hs2)]
        result: dict[str, Any] = dict(outs[-1])
        if self.training:
            result["aux_outputs"] = outs[:-1]
        return result


if "tiny_test" not in DETECTORS._entries:  # imported under two names in one process: register once

    @DETECTORS.register("tiny_test")
    def tiny_test(num_classes: int = 3, hidden_dim: int = 32, num_queries: int = 8, dropout: float = 0.1,
                  nan_after: int = -1, nan_count: int = 0) -> TinyDetector:
        """The engine tests' detector (see the module docstring)."""
        return TinyDetector(num_classes, hidden_dim, num_queries, dropout, nan_after, nan_count)


def collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]):
    h = max(img.shape[1] for img, _ in batch)
    w = max(img.shape[2] for img, _ in batch)
    images = torch.zeros(len(batch), 3, h, w)
    mask = torch.ones(len(batch), h, w, dtype=torch.bool)
    for i, (img, _) in enumerate(batch):
        images[i, :, : img.shape[1], : img.shape[2]] = img
        mask[i, : img.shape[1], : img.shape[2]] = False
    return images, mask, [t for _, t in batch]


class TinyShapes(Dataset):
    """Coloured squares on noise; label = colour. ``empty``: indices with no object."""

    def __init__(self, n: int = 16, size: int = 32, seed: int = 0, classes: Sequence[str] = ("red", "green", "blue"),
                 cat_ids: Sequence[int] | None = None, empty: Sequence[int] = (), flip: bool = True,
                 max_objects: int = 3) -> None:
        self.n, self.size, self.seed = n, size, seed
        self.classes = list(classes)
        self.cat_ids = list(cat_ids) if cat_ids is not None else [10 * (i + 1) for i in range(len(self.classes))]
        self.empty = set(empty)
        self.flip = flip
        self.max_objects = max_objects
        self.collate_fn = collate
        self.annotations = [self._make(i) for i in range(n)]

    def _make(self, i: int) -> list[tuple[int, list[float]]]:
        rng = np.random.default_rng(self.seed * 100003 + i)
        if i in self.empty:
            return []
        objs = []
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            side = float(rng.uniform(0.25, 0.45)) * self.size
            x0 = float(rng.uniform(0, self.size - side))
            y0 = float(rng.uniform(0, self.size - side))
            objs.append((int(rng.integers(0, len(self.classes))), [x0, y0, side, side]))
        return objs

    def __len__(self) -> int:
        return self.n

    def image(self, i: int) -> np.ndarray:
        rng = np.random.default_rng(self.seed * 100003 + i + 7)
        img = rng.integers(0, 60, (self.size, self.size, 3)).astype(np.uint8)
        for label, (x, y, w, h) in self.annotations[i]:
            img[int(y):int(y + h), int(x):int(x + w)] = COLOURS[label % len(COLOURS)]
        return img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        img = torch.from_numpy(self.image(i)).permute(2, 0, 1).float() / 255
        boxes = torch.tensor([b for _, b in self.annotations[i]], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([lab for lab, _ in self.annotations[i]], dtype=torch.long)
        if self.flip and random.random() < 0.5:
            img = img.flip(-1)
            boxes[:, 0] = self.size - boxes[:, 0] - boxes[:, 2]
        cxcywh = torch.cat([boxes[:, :2] + boxes[:, 2:] / 2, boxes[:, 2:]], 1) / self.size
        target = {"labels": labels, "boxes": cxcywh, "image_id": i,
                  "orig_size": torch.tensor([self.size, self.size]), "size": torch.tensor([self.size, self.size])}
        return (img - MEAN) / STD, target

    def coco_gt(self):
        from pycocotools.coco import COCO

        images = [{"id": i, "width": self.size, "height": self.size, "file_name": f"{i}.png"} for i in range(self.n)]
        anns = []
        for i, objs in enumerate(self.annotations):
            for label, (x, y, w, h) in objs:
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": self.cat_ids[label],
                             "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        coco = COCO()
        coco.dataset = {"images": images, "annotations": anns,
                        "categories": [{"id": c, "name": n} for c, n in zip(self.cat_ids, self.classes)]}
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco
