"""detkit: modular object detection (DETR, LW-DETR) built from registered components and YAML configs.

The public API is imported lazily so that ``import detkit`` stays cheap::

    from detkit import compose, build_model, load_checkpoint
    cfg = compose("configs/detr_r50.yaml", ["model.num_queries=100"])
    model = build_model(cfg.model).eval()
"""

from __future__ import annotations

import importlib
from typing import Any

from detkit import plugins as _plugins  # noqa: F401 - installs the registries' loader (built-ins, entry points)

__version__ = "0.1.0"

_LAZY = {
    "compose": "detkit.config",
    "save_resolved": "detkit.config",
    "build_model": "detkit.models.build",
    "load_checkpoint": "detkit.weights.state",
    "save_checkpoint": "detkit.weights.io",
    "Detector": "detkit.predict",
    "DetkitError": "detkit.errors",
    "ConfigError": "detkit.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'detkit' has no attribute {name!r}")
