"""Batching: images zero-padded bottom/right to the batch maximum, with a padding mask."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def collate(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """``[(image (3, H_i, W_i), target), ...] -> (images (B, 3, Hmax, Wmax), mask (B, Hmax, Wmax), targets)``.

    Images are placed top-left; padding is 0 (after normalisation, as the official code does) and ``mask`` is True
    on padding. ``targets`` is the list of target dicts, unchanged.
    """
    if not batch:
        raise ValueError("collate() got an empty batch")
    images = [item[0] for item in batch]
    h = max(int(im.shape[1]) for im in images)
    w = max(int(im.shape[2]) for im in images)
    out = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool)
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]].copy_(im)
        mask[i, : im.shape[1], : im.shape[2]] = False
    return out, mask, [item[1] for item in batch]
