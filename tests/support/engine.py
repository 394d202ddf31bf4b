"""Helpers of the engine tests: a composed config for the tiny detector, state-dict comparison."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

from detkit.config import compose

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent


def tiny_config(tmp_path: Path, overrides: list[str] = (), name: str = "run", **train: Any):
    """A composed config that trains the ``tiny_test`` detector (from ``support.tiny_detector``) on CPU."""
    body = {
        "model": {"type": "tiny_test"},
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "lr_backbone": 1e-3, "seed": 7,
                  "deterministic": True, "checkpoint_minutes": 0, **train},
        "data": {"num_workers": 0},
        "runtime": {"output_dir": str(tmp_path / name), "device": "cpu", "progress": "log", "threads": 1,
                    "tensorboard": False, "plot": False},
        "plugins": {"imports": ["support.tiny_detector"]},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.{os.getpid()}.yaml"  # one file per process: ranks of a DDP test share tmp_path
    path.write_text(yaml.safe_dump(body))
    return compose(path, list(overrides))


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), f"{k} differs (max {float((a[k].float() - b[k].float()).abs().max())})"
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
