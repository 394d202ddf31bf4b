"""Process-wide float32 precision settings (``runtime.tf32``).

On Ampere and later GPUs, TF32 tensor cores run float32 matrix products and convolutions several times faster with
a 10-bit mantissa in the products (accumulation stays float32). PyTorch enables it for cuDNN convolutions but not
for cuBLAS matmuls; detkit's tools (train, eval, predict, bench) enable both unless ``runtime.tf32: false``
(``detkit predict --no-tf32``). It has no effect on the CPU. Mixed precision (``train.amp``) is a separate setting
and keeps the geometry in float32 (see :mod:`detkit.ops.precision`).
"""

from __future__ import annotations

import torch

__all__ = ["configure_tf32", "tf32_enabled"]


def configure_tf32(enabled: bool) -> None:
    """Let CUDA float32 matmuls (cuBLAS) and convolutions (cuDNN) use TF32, or make both full float32.

    Uses the ``allow_tf32`` flags, which every supported PyTorch (2.6 and later) has; a process must not also set
    the newer ``fp32_precision`` attributes (PyTorch refuses to read a mix of the two).
    """
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def tf32_enabled() -> bool:
    """Whether both CUDA float32 matmuls and convolutions may use TF32 now."""
    return bool(torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32)
