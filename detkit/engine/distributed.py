"""Process-group set-up and small helpers for data-parallel training.

``torchrun --nproc_per_node=N tools/train.py CONFIG`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``; :func:`init_distributed` reads them and starts the process group (NCCL on GPU, gloo on CPU) with
a timeout, so a rank that dies or raises makes the others fail within a bounded time instead of hanging. Each rank
takes its own GPU (see :mod:`detkit.engine.device`). Without those variables everything runs in one process and the
helpers below are no-ops.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from detkit.engine.device import env_local_rank, resolve_device
from detkit.errors import ConfigError


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: float = 600) -> DistInfo:
    """Start the process group when launched by torchrun (``WORLD_SIZE`` > 1) and pick this rank's device."""
    world = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = env_local_rank()
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistInfo(0, 1, 0, dev, None)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ConfigError(f"runtime.dist_backend must be auto, nccl or gloo, got {backend!r}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=float(timeout_s)), **kwargs)
    return DistInfo(rank, world, local_rank, dev, backend)


def teardown(synchronize: bool | None = None) -> None:
    """Destroy the process group if this process started one (safe to call twice).

    ``synchronize``: first wait at a barrier until every rank gets here, so that no rank tears its gloo connections
    down while another still works (a rank destroying its group early could abort at exit with "terminate called
    without an active exception"). ``None`` (default) synchronises unless an exception is on its way out, where a
    barrier would only wait for the process-group timeout.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronize is None:
        synchronize = sys.exc_info()[0] is None
    if synchronize:
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a failed peer: destroy anyway
            pass
    dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the ``with`` block on rank 0 first, then on the other ranks.

    For work that fills a cache shared by the ranks, such as downloading pretrained weights: the other ranks wait at
    a barrier until rank 0 has finished the block (and filled the cache), so the file is fetched once instead of by
    every rank at the same time. The block must not use collectives. When it raises on rank 0, rank 0 never reaches
    the barrier and the other ranks fail with the process group's timeout (or are stopped by torchrun), never run the
    block themselves. Without a process group the block just runs.
    """
    main = get_rank() == 0
    if not main:
        barrier()  # wait for rank 0 to finish the block
    yield
    if main:
        barrier()  # release the other ranks


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` as a list indexed by rank (``[obj]`` without a process group)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` as a list indexed by rank on rank ``dst``, None on the other ranks (``[obj]`` without a
    process group). Unlike :func:`all_gather_object`, the other ranks never hold the whole list."""
    if not is_dist():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum``, ``mean`` or ``max``); returns ``tensor``."""
    if not is_dist():
        return tensor
    if op == "mean":
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the global batch, for CPU (gloo) runs, where torch's
    :class:`~torch.nn.SyncBatchNorm` has no kernels (and DDP refuses it): the per-channel sums, sums of squares and
    counts of every rank are summed with the differentiable ``torch.distributed.nn.functional.all_reduce``, so the
    statistics and their gradients are those of one process on the whole batch. Outside a process group and in
    evaluation it is plain batch norm. Made by :func:`convert_sync_batchnorm` by changing the class of a
    ``BatchNorm1d/2d/3d`` in place: same parameters, buffers and state-dict keys."""

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 - torch's name
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's name
        if not (self.training and is_dist() and dist.get_world_size() > 1):
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        dims = [0, *range(2, input.dim())]
        channels = input.shape[1]
        count = torch.full((1,), input.numel() // channels, dtype=input.dtype, device=input.device)
        stats = differentiable_all_reduce(torch.cat([input.sum(dims), (input * input).sum(dims), count]))
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels: 2 * channels] / total - mean * mean).clamp(min=0)  # biased, as batch norm uses
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * total / (total - 1).clamp(min=1), factor)
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm layer of ``model`` synchronised across ranks (``runtime.sync_bn`` under DDP, as the
    official LW-DETR does; DETR's ResNet has frozen batch norms only, which are left alone): torch's
    :class:`~torch.nn.SyncBatchNorm` on GPUs, :class:`CPUSyncBatchNorm` on the CPU. In place for any model whose root
    is not itself a batch norm; the parameters and buffers stay the same tensor objects, so an optimizer, EMA or
    callback built before keeps working. Returns the model."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            module.__class__ = CPUSyncBatchNorm
    return model
