"""A probe that counts host synchronisations on the CPU.

On a GPU, reading a tensor's values on the host (``.item()``, ``float(t)``, ``.tolist()``, ``if t:``, ``.cpu()``,
``.numpy()``) or an op whose output shape depends on the values (``nonzero``, boolean-mask indexing, ``unique``)
waits for every queued kernel. The same calls happen on the CPU, so counting them there (with a
``TorchFunctionMode``, which sees every tensor method) tells how often a step would stall a GPU.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

#: tensor methods and functions that read values back to the host
READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu", "nonzero", "argwhere",
         "masked_select", "unique", "unique_consecutive", "bincount", "repeat_interleave", "equal", "allclose"}


def _is_bool_mask(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.bool
    if isinstance(value, (tuple, list)):
        return any(_is_bool_mask(v) for v in value)
    return False


class HostSyncCounter(TorchFunctionMode):
    """``with HostSyncCounter() as probe: ...`` counts host reads in ``probe.outside`` (by name), and separately in
    ``probe.inside`` those made while a module passed to :meth:`exclude` runs (e.g. the matcher, whose assignment
    runs on the host by design)."""

    def __init__(self) -> None:
        super().__init__()
        self.outside: Counter[str] = Counter()
        self.inside: Counter[str] = Counter()
        self._depth = 0
        self._handles: list[Any] = []

    def exclude(self, module: nn.Module) -> None:
        def enter(*_: Any) -> None:
            self._depth += 1

        def leave(*_: Any) -> None:
            self._depth -= 1

        self._handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in READS or (name == "__getitem__" and len(args) > 1 and _is_bool_mask(args[1])):
            (self.inside if self._depth else self.outside)[name] += 1
        return func(*args, **(kwargs or {}))
