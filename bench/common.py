"""Timing, memory and environment helpers of the benchmark suite (``bench/run.py``)."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Timing", "time_interleaved", "time_one", "machine_info", "rss_mb", "sync", "trim_memory"]


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels (CUDA); a no-op on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Seconds of each timed run of one candidate; ``median`` is what the tables report."""

    name: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def spread(self) -> tuple[float, float]:
        return (min(self.samples), max(self.samples)) if self.samples else (float("nan"), float("nan"))

    def ms(self) -> str:
        lo, hi = self.spread
        return f"{self.median * 1e3:.1f} ({lo * 1e3:.0f}-{hi * 1e3:.0f})"


def time_interleaved(
    candidates: Mapping[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device | str = "cpu",
    budget_s: float | None = None,
) -> dict[str, Timing]:
    """Time several callables round-robin (``A B C A B C ...``) so that they share the machine's noise.

    Each candidate first runs ``warmup`` untimed calls; then ``repeats`` rounds time one call of each. ``budget_s``
    stops adding rounds once exceeded (at least one timed round always runs).
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
        sync(device)
    out = {name: Timing(name) for name in candidates}
    start = time.perf_counter()
    for r in range(repeats):
        for name, fn in candidates.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            out[name].samples.append(time.perf_counter() - t0)
        if budget_s is not None and r >= 0 and time.perf_counter() - start > budget_s:
            break
    return out


def time_one(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device | str = "cpu") -> Timing:
    return time_interleaved({"_": fn}, repeats, warmup, device)["_"]


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (``VmHWM``; unlike ``ru_maxrss`` it is not carried over from
    the parent across ``exec``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def trim_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so RSS readings start from a clean floor."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str, threads: int) -> dict[str, str]:
    """Machine, versions and settings written at the top of RESULTS.md."""
    info: dict[str, str] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": f"{_cpu_name()} ({os.cpu_count()} logical CPUs visible)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device if device == "cpu" else f"{device} ({torch.cuda.get_device_name()})",
        "torch threads": str(threads),
    }
    try:
        import psutil

        info["memory"] = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except ImportError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("torchvision", "transformers", "onnxruntime", "onnx", "scipy", "pycocotools", "faster-coco-eval",
                 "albumentations", "timm", "numpy"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = "not installed"
    info["mkldnn"] = str(torch.backends.mkldnn.is_available())
    return info


def fmt_ratio(num: float, den: float) -> str:
    return f"{num / den:.2f}" if den and den == den and num == num else "n/a"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
