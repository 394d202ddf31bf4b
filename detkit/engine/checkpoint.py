"""Checkpoint files: atomic writes, safe loads, and loading weights into a model with a report.

A detkit checkpoint is a plain dict (``model``, ``optimizer``, ``scheduler``, ``ema``, ``scaler``, ``epoch``,
``step``, ``rng``, ``config``, ``classes``, ``cat_ids``, ``plugins``, ``detkit_version``), saved with ``torch.save``
and always loaded with ``torch.load(weights_only=True)``: a file that needs arbitrary unpickling is refused.
``cat_ids[label]`` is the training data set's original category id of each label (e.g. COCO's), used when writing
COCO results; it is None when the data set has none, and absent from checkpoints of older versions.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from detkit.errors import CheckpointError


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, then rename.

    A crash at any moment leaves either the previous file or the new one, never a partial file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint to {path.parent}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from e
        raise
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files :func:`save_checkpoint` leaves when the process is killed while writing
    (``.<name>.pth.<random>.tmp``, as large as a checkpoint); returns what was removed. Call it only where no other
    process is writing checkpoints into ``directory`` (the trainer does, on rank 0, before its first step)."""
    removed = []
    for tmp in Path(directory).glob(".*.pth.*.tmp"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def load_checkpoint_file(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``; every failure is a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it contains Python objects that would run code when unpickled, and "
            "detkit only loads checkpoints with torch.load(weights_only=True).\n"
            "If you trust this file (you made it, or it comes from an official release), convert it once with\n"
            f"  python tools/convert_checkpoint.py {path} --trust-pickle --format auto --out CONVERTED.pth\n"
            f"which re-saves the tensors only. Details: {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated or not a torch file ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


@dataclass
class LoadReport:
    """What happened to each key when weights were loaded into a model."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    reshaped: list[str] = field(default_factory=list)  # shape differs: left as initialised (or resized, if allowed)
    source: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.reshaped)

    def table(self) -> str:
        rows = [("loaded", self.loaded), ("missing", self.missing), ("unexpected", self.unexpected),
                ("shape mismatch", self.reshaped)]
        lines = [f"weights from {self.source}" if self.source else "weights"]
        for name, keys in rows:
            shown = ", ".join(keys[:6]) + (f", ... (+{len(keys) - 6})" if len(keys) > 6 else "")
            lines.append(f"  {name:<15} {len(keys):>6}  {shown if name != 'loaded' else ''}".rstrip())
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "loaded": len(self.loaded), "missing": self.missing,
                "unexpected": self.unexpected, "reshaped": self.reshaped}


def load_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True,
                    source: str = "") -> LoadReport:
    """Copy ``state`` into ``model`` and report loaded / missing / unexpected / reshaped keys.

    With ``strict=True`` any missing, unexpected or reshaped key is a :class:`CheckpointError` listing them.
    """
    own = model.state_dict()
    report = LoadReport(source=source)
    usable: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(own[key].shape) != tuple(value.shape):
            report.reshaped.append(f"{key} {tuple(value.shape)}->{tuple(own[key].shape)}")
        else:
            usable[key] = value
            report.loaded.append(key)
    report.missing = [k for k in own if k not in state]
    if strict and not report.ok:
        raise CheckpointError(f"checkpoint does not fit the model:\n{report.table()}\n"
                              + _detail(report))
    model.load_state_dict(usable, strict=False)
    return report


def _detail(report: LoadReport) -> str:
    parts = []
    for name, keys in (("missing", report.missing), ("unexpected", report.unexpected),
                       ("shape mismatch", report.reshaped)):
        if keys:
            parts.append(f"{name}: " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
    return "\n".join(parts)


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str], strict: bool = True,
                    use_ema: bool = False) -> LoadReport:
    """Load the weights of a detkit checkpoint into ``model`` (``weights_only``) and return a :class:`LoadReport`.

    :param use_ema: take the EMA weights when the checkpoint has them.
    """
    ckpt = load_checkpoint_file(path)
    key = "ema" if use_ema and ckpt.get("ema") else "model"
    if key not in ckpt:
        raise CheckpointError(f"{path} has no {key!r} entry (keys: {', '.join(map(str, ckpt))})")
    state = ckpt[key]
    if key == "ema" and isinstance(state, Mapping) and "module" in state:
        state = state["module"]
    return load_state_dict(model, state, strict=strict, source=str(path))


# ---------------------------------------------------------------------------------------------------------------------
# Training state helpers (engine): random generator states, resume look-up, fine-tuning with other classes
# ---------------------------------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """States of python's, numpy's and torch's (CPU and CUDA) generators, in a ``weights_only``-loadable form."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (entries that are absent are left alone)."""
    import random

    import numpy as np

    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def find_last_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """``run_dir/checkpoint_last.pth`` when it exists (what ``train.resume=auto`` continues from)."""
    path = Path(run_dir) / "checkpoint_last.pth"
    return path if path.is_file() else None


@dataclass
class FinetuneReport:
    """What fine-tuning from a checkpoint with other classes did to each key."""

    source: str = ""
    loaded: list[str] = field(default_factory=list)
    class_rows: list[str] = field(default_factory=list)  # class-head keys whose rows were matched by class name
    matched_classes: list[str] = field(default_factory=list)
    new_classes: list[str] = field(default_factory=list)  # rows left as initialised
    reinitialised: list[str] = field(default_factory=list)  # keys left as initialised (missing or other shape)
    skipped: list[str] = field(default_factory=list)  # keys of the file the model does not have

    def table(self) -> str:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... (+{len(keys) - 8})" if len(keys) > 8 else "")

        return "\n".join([
            f"fine-tuning from {self.source}",
            f"  loaded          {len(self.loaded):>6}",
            f"  class heads     {len(self.class_rows):>6}  {show(self.class_rows)}".rstrip(),
            f"    rows kept     {len(self.matched_classes):>6}  {show(self.matched_classes)}".rstrip(),
            f"    rows new      {len(self.new_classes):>6}  {show(self.new_classes)}".rstrip(),
            f"  re-initialised  {len(self.reinitialised):>6}  {show(self.reinitialised)}".rstrip(),
            f"  skipped         {len(self.skipped):>6}  {show(self.skipped)}".rstrip(),
        ])

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "loaded": len(self.loaded), "class_rows": self.class_rows,
                "matched_classes": self.matched_classes, "new_classes": self.new_classes,
                "reinitialised": self.reinitialised, "skipped": self.skipped}


#: class names that are placeholders (unused COCO ids) and never matched between checkpoints
PLACEHOLDER_CLASSES = frozenset({"N/A", "n/a", ""})


def is_class_head_key(key: str, shape: tuple[int, ...], num_classes: int) -> bool:
    """A class-head entry: its name contains ``class_embed`` and its first dimension is ``num_classes`` or
    ``num_classes + 1`` (DETR's no-object row)."""
    return "class_embed" in key and len(shape) >= 1 and shape[0] in (num_classes, num_classes + 1)


def finetune_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], new_classes: list[str],
                        old_classes: list[str] | None, source: str = "") -> FinetuneReport:
    """Load ``state`` into ``model`` for fine-tuning on ``new_classes``.

    Keys with equal shapes are copied, except class heads (see :func:`is_class_head_key`) when the class lists
    differ: there row ``i`` takes the checkpoint row of the class with the same name, the no-object row (DETR) is
    kept, and rows of classes the checkpoint does not know stay as the model initialised them. Keys whose shape
    differs otherwise are re-initialised; keys the model lacks are skipped. Nothing raises: the report says it all.
    The work is done by :func:`detkit.models.pretrained.load_detector_state` (what ``model.init_from`` and
    ``train.finetune_from`` use).
    """
    from detkit.models.pretrained import WeightsReport, load_detector_state

    full = load_detector_state(model, state, WeightsReport(source=source), new_classes=new_classes,
                               old_classes=old_classes)
    return FinetuneReport(source=source, loaded=full.loaded + full.converted + full.resized,
                          class_rows=full.class_rows, matched_classes=full.matched_classes,
                          new_classes=full.new_classes, reinitialised=full.reinitialised, skipped=full.unexpected)
