"""Training-state helpers of the engine: random generator states and the resume look-up.

Weight files themselves (atomic save, ``weights_only`` load, loading into a model) live in :mod:`detkit.weights`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["capture_rng", "restore_rng", "find_last_checkpoint"]


def capture_rng() -> dict[str, Any]:
    """States of python's, numpy's and torch's (CPU and CUDA) generators, in a ``weights_only``-loadable form."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (entries that are absent are left alone)."""
    import random

    import numpy as np

    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def find_last_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """``run_dir/checkpoint_last.pth`` when it exists (what ``train.resume=auto`` continues from)."""
    path = Path(run_dir) / "checkpoint_last.pth"
    return path if path.is_file() else None
