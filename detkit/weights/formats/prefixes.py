"""Prefix renaming shared by the official-checkpoint converters: tensors pass through, only keys change."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from detkit.errors import CheckpointError


def shorten(keys: list[str], n: int = 10) -> str:
    """The first ``n`` keys, comma-separated, with a count of the rest."""
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


def rename_prefixes(state: Mapping[str, Any], pairs: tuple[tuple[str, str], ...], what: str,
                    drop_suffixes: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """Rename each key by the first ``(src, dst)`` prefix pair that matches; keys ending in ``drop_suffixes`` are
    dropped. A key no pair matches is a :class:`CheckpointError` naming it (``what``: e.g. "an official DETR")."""
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if drop_suffixes and key.endswith(drop_suffixes):
            continue
        for src, dst in pairs:
            if key.startswith(src):
                out[dst + key[len(src):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{len(unknown)} key(s) do not belong to {what} state dict: {shorten(unknown)}")
    return out
