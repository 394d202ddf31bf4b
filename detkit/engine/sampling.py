"""Reproducible batch order and per-sample augmentation seeds.

Exact resume needs two things to be pure functions of ``(seed, epoch, position)`` rather than of how far some random
generator has advanced:

- the order of the samples (:class:`EpochBatchSampler`: a permutation drawn from ``seed + epoch``; a resumed run
  skips the batches it already did), and
- the random augmentation of each sample (:class:`SeededDataset`: the batch sampler hands out ``(index, sample_seed)``
  pairs, and the wrapper re-seeds python, numpy, torch and the data set's albumentations pipelines from
  ``sample_seed`` before loading that sample). The seed depends on ``(seed, epoch, index)`` only, so a sample looks
  the same whichever rank or worker loads it.

With ``world_size`` ranks each global batch of ``batch_size * world_size`` samples is cut into contiguous per-rank
slices, so N processes with batch B see exactly the samples one process with batch N*B would see.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from detkit.data.report import load_counting


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed that depends only on (seed, epoch, index)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(1)[0])


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, sample_seed)`` for one rank, in an order fixed by ``(seed, epoch)``.

    :param num_samples: length of the data set.
    :param batch_size: samples per batch on this rank.
    :param shuffle: permute with ``torch.Generator().manual_seed(seed + epoch)``; else sequential.
    :param drop_last: drop the last incomplete global batch (else it is kept, split evenly over the ranks; the
        order is padded by repeating its start so every rank gets the same number of batches).
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order and skip its first ``start_batch`` batches (mid-epoch resume)."""
        self.epoch = epoch
        self.start_batch = start_batch

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def num_batches(self) -> int:
        """Batches per epoch (the same on every rank), counting skipped ones."""
        if self.num_samples == 0:
            return 0
        if self.drop_last:
            return self.num_samples // self.global_batch
        return math.ceil(self.num_samples / self.global_batch)

    def __len__(self) -> int:
        return max(self.num_batches() - self.start_batch, 0)

    def order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            return torch.randperm(self.num_samples, generator=g).tolist()
        return list(range(self.num_samples))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order()
        n_batches = self.num_batches()
        if not self.drop_last and n_batches:
            # pad to a multiple of world_size so the ranks stay in step
            total = math.ceil(len(order) / self.world_size) * self.world_size
            order = (order * math.ceil(total / len(order)))[:total]
        for b in range(self.start_batch, n_batches):
            chunk = order[b * self.global_batch:(b + 1) * self.global_batch]
            per_rank = len(chunk) // self.world_size
            mine = chunk[self.rank * per_rank:(self.rank + 1) * per_rank]
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in mine]


class ShardSampler(Sampler[int]):
    """Evaluation: rank ``r`` takes samples ``r, r + world, ...`` (no padding, no duplicates)."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, num_samples, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def reseed_dataset(dataset: Any, seed: int) -> None:
    """Re-seed every albumentations pipeline a data set holds (its own ``reseed`` method wins when it has one)."""
    hook = getattr(dataset, "reseed", None)
    if callable(hook):
        hook(seed)
        return
    try:
        from albumentations.core.composition import BaseCompose
    except ImportError:  # pragma: no cover - albumentations is a dependency
        return
    for value in vars(dataset).values():
        candidates = value if isinstance(value, (list, tuple)) else [value]
        for item in candidates:
            if isinstance(item, BaseCompose):
                item.set_random_seed(seed)
            elif hasattr(item, "__dict__") and not isinstance(item, (torch.Tensor, np.ndarray, Dataset)):
                for inner in vars(item).values():
                    if isinstance(inner, BaseCompose):
                        inner.set_random_seed(seed)


class SeededDataset(Dataset):
    """Wraps a data set so that ``ds[(index, seed)]`` loads ``index`` with every random generator seeded by ``seed``.

    Plain integer keys are passed through unchanged (evaluation). Attributes of the wrapped data set are forwarded.
    In a DataLoader worker, a sample comes back as a :class:`~detkit.data.report.CountedSample` carrying what its
    loading counted in the data set's report; build the loader with :class:`~detkit.data.report.CountingCollate`
    and iterate it through :class:`~detkit.data.report.CountedLoader` to bring those counts into this process.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        return load_counting(self.dataset, lambda: self._load(key))

    def _load(self, key: int | tuple[int, int]) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        in_main = torch.utils.data.get_worker_info() is None
        if in_main:  # loading in the training process must not disturb the model's random streams
            saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        try:
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            reseed_dataset(self.dataset, seed)
            return self.dataset[index]
        finally:
            if in_main:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
