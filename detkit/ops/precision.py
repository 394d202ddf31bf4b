"""Keeping geometry in full precision under mixed-precision autocast.

Under ``torch.autocast`` (bf16 / fp16) the linear layers and attention return low-precision tensors. Coordinates
must not follow them: a bf16 number carries 8 significant bits, so a normalised box edge or a ``grid_sample``
location near 1 is off by up to 1/256 of the image (2.5 px at 640) before any arithmetic. The models therefore cast
the outputs of the box layers, the reference points, the proposals and the sampling locations to
:func:`geometry_dtype` (float32, or wider when the model itself runs wider, e.g. float64 in gradient checks) and do
the element-wise geometry there; autocast leaves element-wise operations in their input's dtype. In fp32 every cast
below is a no-op, so fp32 results are unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["geometry_dtype", "at_least_float32"]


def geometry_dtype(*tensors: Tensor) -> torch.dtype:
    """The widest floating dtype among ``tensors`` and float32 (bf16/fp16 inputs give float32, float64 stays)."""
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` cast to :func:`geometry_dtype` (returned as is when it already is float32 or wider)."""
    return x.to(geometry_dtype(x))
