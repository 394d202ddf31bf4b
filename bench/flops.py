"""Arithmetic floor of a forward or training step: its matrix-product FLOPs over the machine's measured GEMM peak.

The inference and training tables compare detkit to HF transformers; this answers a different question, how far any
fp32 implementation of the same arithmetic could go on the machine at hand. ``count_flops`` counts the FLOPs of the
matrix products, convolutions and attention a callable runs (PyTorch's own ``flop_registry`` formulas, plus the CPU
flash-attention ops it lacks); elementwise work, softmax's ``exp`` and memory traffic are left out, so the floor is
a lower bound that no real run reaches.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry

from bench.common import sync

__all__ = ["count_flops", "gemm_peak_gflops"]


def _shape(x: Any) -> Any:
    return x.shape if isinstance(x, torch.Tensor) else x


def _attention_flops(name: str, q: torch.Tensor, k: torch.Tensor) -> int:
    """``Q K^T`` and ``P V`` in the forward (2 products of ``2 * numel(q) * Lk`` each); the backward needs 4 (dV, dP,
    dQ, dK), counted without the recomputation of ``Q K^T`` that flash kernels add."""
    per_product = 2 * q.numel() * k.shape[-2]
    return per_product * (4 if "backward" in name else 2)


class _FlopCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - the dispatcher's signature
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        name = str(packet)
        if "scaled_dot_product" in name:
            # backward ops take grad_out first: (grad_out, q, k, ...)
            q, k = (args[1], args[2]) if "backward" in name else (args[0], args[1])
            self.counts["attention"] += _attention_flops(name, q, k)
        elif packet in flop_registry:
            key = "convolution" if "convolution" in name else "matmul"
            self.counts[key] += flop_registry[packet](*tree_map(_shape, args), **tree_map(_shape, kwargs),
                                                      out_val=tree_map(_shape, out))
        return out


def count_flops(fn: Callable[[], Any]) -> dict[str, int]:
    """FLOPs of one call of ``fn`` by kind: ``matmul``, ``convolution``, ``attention``.

    Run it with autograd enabled (even for an eval forward) so that composite ops reach the counter decomposed, and
    detkit's fused CPU inference kernels (oneDNN conv + add + ReLU, which the registry does not know) give way to
    the plain ops doing the same arithmetic.
    """
    counter = _FlopCounter()
    with torch.enable_grad(), counter:
        fn()
    return dict(counter.counts)


def gemm_peak_gflops(size: int = 2048, repeats: int = 10, device: str = "cpu") -> float:
    """Best fp32 GEMM throughput (GFLOP/s) of ``repeats`` square products, on the current thread count."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = float("inf")
    with torch.inference_mode():
        torch.mm(a, b)
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9
