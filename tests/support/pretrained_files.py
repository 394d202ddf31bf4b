"""Small stand-ins for the pretrained files the COCO recipes start from, built from the reference shape files in
``shared/reference/state_dicts``: zeros (ones for BN variances) stored with stride 0, so a file of a full-size model
takes a few kB, except the keys containing one of ``real``, which get random values a test can look for."""

from __future__ import annotations

import json
import math
import os
import urllib.parse
from pathlib import Path

import torch

#: Objects365 class slots of the official LW-DETR pretraining checkpoints (``num_classes 366``)
O365_SLOTS = 366


def reference_shapes(shared: Path, variant: str) -> dict[str, list[int]]:
    shapes = json.loads((shared / f"reference/state_dicts/{variant}.json").read_text())
    shapes.pop("__num_params__", None)
    return shapes


def _tensor(key: str, shape: list[int], real: tuple[str, ...], gen: torch.Generator) -> torch.Tensor:
    if any(r in key for r in real):
        return torch.randn(shape, generator=gen) / math.sqrt(max(1, math.prod(shape[1:])))
    return torch.ones(()).expand(shape) if key.endswith("running_var") else torch.zeros(()).expand(shape)


def torchvision_resnet_state(shared: Path, depth: int, real: tuple[str, ...] = (), seed: int = 0
                             ) -> dict[str, torch.Tensor]:
    """A torchvision ``resnet{depth}`` state dict (the layout of ``ResNet*_Weights`` files, without ``fc``)."""
    gen = torch.Generator().manual_seed(seed)
    prefix = "backbone.0.body."
    return {key[len(prefix):]: _tensor(key, shape, real, gen)
            for key, shape in reference_shapes(shared, f"detr_r{depth}").items() if key.startswith(prefix)}


def official_lwdetr_o365(shared: Path, size: str, real: tuple[str, ...] = (), seed: int = 0) -> dict:
    """An official LW-DETR Objects365 pretraining checkpoint (``model`` + ``ema_model``): the COCO reference shapes
    with every class head (``class_embed``, ``transformer.enc_out_class_embed.*``) at :data:`O365_SLOTS` rows."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in reference_shapes(shared, f"lwdetr_{size}").items():
        if "class_embed" in key:
            shape = [O365_SLOTS, *shape[1:]]
        state[key] = _tensor(key, shape, real, gen)
    ema = {k: v + 1 if any(r in k for r in real) else v for k, v in state.items()}  # the recipe must not take it
    return {"model": state, "ema_model": ema, "epoch": 29}


def prefill_hub_cache(torch_home: Path, url: str, checkpoint: dict) -> Path:
    """Save ``checkpoint`` where :func:`detkit.weights.io.resolve_source` caches ``url`` under ``torch_home``
    (``$TORCH_HOME/hub/checkpoints/<file name of the URL>``)."""
    path = torch_home / "hub" / "checkpoints" / os.path.basename(urllib.parse.urlparse(url).path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path
