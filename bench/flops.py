"""Arithmetic floor of a forward or training step: its matrix-product FLOPs over the machine's measured GEMM peak.

The inference and training tables compare detkit to HF transformers; this answers a different question, how far any
fp32 implementation of the same arithmetic could go on the machine at hand. ``count_flops`` counts the FLOPs of the
matrix products, convolutions and attention a callable runs (PyTorch's ``FlopCounterMode``, plus formulas for the
CPU flash-attention ops it lacks); elementwise work, softmax's ``exp`` and memory traffic are left out, so the floor is
a lower bound that no real run reaches.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from math import prod
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import sync

__all__ = ["KINDS", "count_flops", "gemm_peak_gflops"]

#: the keys of :func:`count_flops`'s result
KINDS = ("convolution", "matmul", "attention")


def _cpu_attention_forward(query_shape: torch.Size, key_shape: torch.Size, *args: Any, **kwargs: Any) -> int:
    """``Q K^T`` and ``P V``: 2 products of ``2 * numel(q) * Lk`` FLOPs each."""
    return 2 * 2 * prod(query_shape) * key_shape[-2]


def _cpu_attention_backward(grad_out_shape: torch.Size, query_shape: torch.Size, key_shape: torch.Size, *args: Any,
                            **kwargs: Any) -> int:
    """dV, dP, dQ and dK: 4 products, counted without the recomputation of ``Q K^T`` that flash kernels add."""
    return 4 * 2 * prod(query_shape) * key_shape[-2]


#: formulas for the CPU flash-attention ops, which PyTorch's ``flop_registry`` lacks (on CUDA the registry's own
#: attention formulas apply, and they also count the flash backward's recomputation of ``Q K^T``)
_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def _kind(op: Any) -> str:
    name = str(op)
    if "scaled_dot_product" in name:
        return "attention"
    return "convolution" if "convolution" in name else "matmul"


def count_flops(fn: Callable[[], Any]) -> dict[str, int]:
    """FLOPs of one call of ``fn`` by kind (:data:`KINDS`); kinds it did not run are left out.

    PyTorch's ``FlopCounterMode`` counts, with its formulas plus :data:`_CPU_ATTENTION`. It runs with autograd
    enabled (even for an eval forward) so that detkit's fused CPU inference kernels (oneDNN conv + add + ReLU, which
    the registry does not know) give way to the plain ops doing the same arithmetic.
    """
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    with torch.enable_grad(), counter:
        fn()
    counts: Counter[str] = Counter()
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        if flops:
            counts[_kind(op)] += flops
    return dict(counts)


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
