"""Helpers of the eval / predict / export / bench tool tests.

- :func:`tiny_lwdetr_config` writes a config of a very small LW-DETR on a tiny synthetic data set (128 px);
- :func:`make_checkpoint` builds the model of a config (seeded, untrained) and saves a detkit checkpoint with
  ``config`` and ``classes``, as the trainer does;
- :func:`draw_scene` draws one saturated shape on a muted background and returns its true box;
- ``oracle_test`` (registered by importing :mod:`support.oracle_detector`) is a detector that finds that shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

TINY_LWDETR: dict[str, Any] = {
    "defaults": [str(Path(__file__).resolve().parents[2] / "configs/_base_/models/lwdetr_tiny.yaml")],
    "model": {
        "num_classes": None, "hidden_dim": 32, "num_queries": 12, "group_detr": 2,
        "backbone": {"embed_dim": 32, "depth": 2, "num_heads": 2, "window_blocks": [0], "out_indices": [0, 1]},
        "transformer": {"num_layers": 2, "sa_heads": 2, "ca_heads": 2, "dim_feedforward": 64},
        "postprocessor": {"num_select": 10},
    },
    "data": {
        "num_workers": 0,
        "synthetic": {"image_size": [128, 192], "num_train": 4, "num_val": 4,
                      "shapes": ["circle", "square", "triangle"], "min_objects": 1, "max_objects": 3,
                      "size_range": [0.3, 0.6], "clutter": 0.0},
        "train_transforms": {"type": "lwdetr_val", "size": 128},
        "val_transforms": {"type": "lwdetr_val", "size": 128},
    },
    "train": {"batch_size": 2},
    "runtime": {"device": "cpu", "progress": "log", "tensorboard": False, "plot": False},
}


def _merge(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_config(path: Path, body: dict[str, Any], **changes: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(_merge(body, changes), sort_keys=False))
    return path


def tiny_lwdetr_config(tmp_path: Path, name: str = "tiny_lwdetr.yaml", **changes: Any) -> Path:
    return write_config(tmp_path / name, TINY_LWDETR, **changes)


def make_checkpoint(config: Path, out: Path, seed: int = 0, classes: list[str] | None = None,
                    **extra: Any) -> Path:
    """Build the config's model (num_classes from the data set), save it as a trainer checkpoint would."""
    from detkit.config import compose, to_container
    from detkit.data.build import build_datasets
    from detkit.weights.io import save_checkpoint
    from detkit.engine.trainer import with_num_classes
    from detkit.models.build import build_model

    cfg = compose(config)
    if classes is None:
        _, val = build_datasets(to_container(cfg.data), train=False)
        classes = list(val.classes)
    cfg = with_num_classes(cfg, classes)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    state = {"model": model.state_dict(), "config": to_container(cfg), "classes": list(classes), "epoch": 1,
             "step": 1, "detkit_version": "test", **extra}
    return save_checkpoint(state, out)


def draw_scene(height: int, width: int, box: tuple[int, int, int, int], colour: tuple[int, int, int],
               shape: str = "rect", seed: int = 0) -> np.ndarray:
    """RGB uint8 image: a muted grey gradient with light noise and one saturated ``shape`` filling ``box`` (xyxy,
    exclusive end)."""
    import cv2

    rng = np.random.default_rng(seed)
    ramp = np.linspace(90, 160, width, dtype=np.float32)[None, :, None]
    img = np.broadcast_to(ramp, (height, width, 3)).astype(np.float32)
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    x1, y1, x2, y2 = box
    if shape == "rect":
        img[y1:y2, x1:x2] = colour
    else:  # an ellipse touching the box edges
        cv2.ellipse(img, (((x1 + x2) / 2, (y1 + y2) / 2), (x2 - x1, y2 - y1), 0), colour, -1)
    return img


def box_iou(a: Any, b: Any) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
