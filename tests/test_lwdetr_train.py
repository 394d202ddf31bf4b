"""A few CPU training steps on tiny synthetic images reduce the LW-DETR loss (one-level tiny, two-level large)."""

from __future__ import annotations

import pytest
import torch

from conftest import CONFIGS
from detkit.config import compose
from detkit.engine.optim import param_groups
from detkit.models.build import build_model


def synthetic_batch(size: int = 128):
    """Two images with bright rectangles on noise and their normalised cxcywh targets."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, size, size, generator=g) * 0.1
    rects = [[(0.3, 0.3, 0.3, 0.4, 1), (0.7, 0.6, 0.2, 0.3, 2)], [(0.5, 0.5, 0.5, 0.4, 3)]]
    targets = []
    for i, objs in enumerate(rects):
        for cx, cy, w, h, label in objs:
            x1, y1 = int((cx - w / 2) * size), int((cy - h / 2) * size)
            x2, y2 = int((cx + w / 2) * size), int((cy + h / 2) * size)
            images[i, label - 1, y1:y2, x1:x2] += 2.0
        targets.append({
            "labels": torch.tensor([o[4] for o in objs]),
            "boxes": torch.tensor([o[:4] for o in objs], dtype=torch.float32),
        })
    return images, torch.zeros(2, size, size, dtype=torch.bool), targets


@pytest.mark.slow
@pytest.mark.parametrize(
    "size, overrides",
    [
        ("tiny", ["model.num_queries=30", "model.group_detr=2", "model.backbone.depth=4",
                  "model.backbone.window_blocks=[0,2]", "model.backbone.out_indices=[1,3]",
                  "model.transformer.dim_feedforward=256"]),
        # large keeps its two levels (P3 + P5), width 384, 12/24 heads and 4 points; a smaller ViT keeps it fast
        ("large", ["model.num_queries=30", "model.group_detr=2", "model.backbone.embed_dim=192",
                   "model.backbone.depth=4", "model.backbone.window_blocks=[0,2]", "model.backbone.out_indices=[1,3]",
                   "model.neck.num_blocks=1", "model.transformer.dim_feedforward=256"]),
    ],
)
def test_a_few_steps_reduce_the_loss(size, overrides):
    torch.manual_seed(0)
    cfg = compose(CONFIGS / f"lwdetr_{size}_coco.yaml", overrides + ["train.lr=1.0e-3", "train.lr_encoder=1.0e-3"])
    model = build_model(cfg.model)
    assert len(model.neck.strides) == (2 if size == "large" else 1)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, dict(cfg.train)))
    images, mask, targets = synthetic_batch()
    losses = []
    for _ in range(5):
        out = model(images, mask)
        loss = model.criterion(out, targets)["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_max_norm)
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = model.criterion(model(images, mask), targets)["loss"].item()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert final < 0.95 * losses[0], (losses, final)
