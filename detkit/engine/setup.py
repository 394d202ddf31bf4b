"""The pieces :class:`~detkit.engine.trainer.Trainer` is set up from, one stage at a time.

Seeding and determinism, the run directory and its log file, the checks of the ``train`` section, ``model.num_classes``
from the data set, the keys derived from the data (:mod:`detkit.engine.recipe`), the checkpoint ``train.resume``
continues from and whether it fits this run, and the default callbacks.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from detkit.config import to_container
from detkit.engine import distributed as du
from detkit.engine.checkpoint import find_last_checkpoint
from detkit.errors import CheckpointError, ConfigError
from detkit.registry import CALLBACKS

log = logging.getLogger("detkit.train")

AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels (warn, not fail, where an op has none) and no cuDNN autotuning; otherwise cuDNN picks
    the fastest convolution algorithms for the shapes it sees (``cudnn.benchmark``)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


class RunLogHandler(logging.FileHandler):
    """``train.log``: a record that cannot be written (a full disk) is reported once, as one line on stderr naming the
    file and the cause, and the file is given up; logging's default prints a traceback for every later record. The
    console keeps logging, and ``metrics.jsonl`` stops training with a clear error when it cannot write either."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if self.failed:
            return
        self.failed = True
        err = sys.exc_info()[1]
        sys.stderr.write(f"detkit: cannot write {self.baseFilename}: {err}; no more lines go to that file\n")


def check_writable(path: Path) -> None:
    """Create ``path`` and prove a file can be written there; a :class:`ConfigError` naming it otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"runtime.output_dir {str(path)!r} is not writable: {e.strerror or e}") from e


def check_train_config(train: DictConfig) -> None:
    """A :class:`ConfigError` listing every out-of-range key of the ``train`` section."""
    problems = []
    if train.amp not in AMP_DTYPES:
        problems.append(f"train.amp must be one of {', '.join(AMP_DTYPES)}, got {train.amp!r}")
    for key in ("epochs", "batch_size", "accumulate", "max_bad_steps"):
        if train[key] is not None and int(train[key]) < 1:  # None: derived from the data (checked again after)
            problems.append(f"train.{key} must be >= 1, got {train[key]}")
    if train.max_minutes < 0:
        problems.append(f"train.max_minutes must be >= 0, got {train.max_minutes}")
    if problems:
        raise ConfigError("; ".join(problems))


def with_num_classes(cfg: DictConfig, classes: Sequence[str] | int) -> DictConfig:
    """``cfg`` with ``model.num_classes`` set to the class count when the config leaves it unset or null.

    ``classes`` is the data set's class names, or only their count (``detkit check`` fills a stand-in). An explicit
    value smaller than the class count is an error (labels would fall outside the head).
    """
    names = [str(c) for c in range(classes)] if isinstance(classes, int) else list(classes)
    model = cfg.get("model") or {}
    current = model.get("num_classes") if isinstance(model, Mapping) or OmegaConf.is_config(model) else None
    if current is not None:
        if int(current) < len(names):
            raise ConfigError(f"model.num_classes={current} but the data set has {len(names)} classes "
                              f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''}); "
                              "remove model.num_classes to follow the data set")
        return cfg
    return with_key(cfg, "model.num_classes", len(names))


def with_key(cfg: DictConfig, key: str, value: Any) -> DictConfig:
    """A read-only copy of ``cfg`` with the dotted ``key`` set to ``value``."""
    tree = to_container(cfg)
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    new = OmegaConf.create(tree)
    OmegaConf.set_readonly(new, True)
    return new


def dataset_cat_ids(dataset: Any, num_classes: int) -> list[int] | None:
    """The original category id of each label of ``dataset`` (its ``cat_ids``, e.g. COCO category ids), or None when
    it has none, or not one per class (a checkpoint then maps labels back to categories by its own default)."""
    cat_ids = getattr(dataset, "cat_ids", None)
    if cat_ids is None:
        return None
    try:
        ids = [int(c) for c in cat_ids]
    except (TypeError, ValueError):
        return None
    return ids if len(ids) == num_classes else None


def check_classes(train_ds: Any, val_ds: Any) -> list[str]:
    """The training split's class names; an error when the splits' class lists differ."""
    classes = [str(c) for c in getattr(train_ds, "classes", [])]
    if val_ds is not None and getattr(val_ds, "classes", None) is not None \
            and [str(c) for c in val_ds.classes] != classes:
        raise ConfigError("the training and validation splits have different class lists")
    return classes


def follow_the_data(cfg: DictConfig, train_ds: Any, val_ds: Any, world_size: int, is_main: bool
                    ) -> tuple[DictConfig, Any]:
    """``(cfg, recipe)``: the config's ``null`` derived keys filled from the training split
    (:mod:`detkit.engine.recipe`), each choice logged with its reason once and a warning where the data and explicit
    values disagree; the derived transforms are set on the data sets. ``recipe`` is None for a data set without
    statistics."""
    from detkit.data.transforms import build_transforms
    from detkit.engine.recipe import apply_recipe, data_stats, derive_recipe, pending_keys

    tree = to_container(cfg)
    pending = pending_keys(tree)
    stats = data_stats(train_ds)
    if stats is None:
        if pending:
            raise ConfigError(f"{', '.join(pending)} null: derived from the data, but this data set has no "
                              "annotations(i) / image_info(i) to derive them from; set them")
        return cfg, None
    recipe = derive_recipe(tree, stats, world_size)
    if is_main:
        for warning in recipe.warnings:
            log.warning("data: %s", warning)
        for choice in recipe.choices:
            log.info("derived %s", choice)
    if recipe.choices:
        cfg = OmegaConf.create(apply_recipe(tree, recipe))
        OmegaConf.set_readonly(cfg, True)
        check_train_config(cfg.train)
    still = [k for k in pending_keys(to_container(cfg))]
    if still:
        raise ConfigError(f"{', '.join(still)} null but not derivable for this config (a derived input size "
                          "needs lwdetr_train / lwdetr_val transforms); set them")
    for key, dataset in (("train_transforms", train_ds), ("val_transforms", val_ds)):
        if dataset is not None and any(k.startswith(f"data.{key}.") for k in pending):
            dataset.transforms = build_transforms(to_container(cfg.data[key]))
    return cfg, recipe


def default_callbacks(cfg: DictConfig, model: torch.nn.Module) -> tuple[list[Any], Any]:
    """``(callbacks, ema)``: the running-statistics guard, the EMA (``train.ema``; else None), checkpoint and logger
    callbacks, then ``train.callbacks``. EMA comes first: the checkpoint callback saves what it holds; the running
    statistics of the norm layers are put back after a skipped step before any of them looks at the model."""
    train = cfg.train
    callbacks = [CALLBACKS.build({"type": "running_stats"}, model=model)]
    ema = None
    if train.ema:
        ema = CALLBACKS.build({"type": "ema", "decay": float(train.ema_decay), "tau": int(train.ema_tau)}, model=model)
        callbacks.append(ema)
    callbacks.append(CALLBACKS.build({"type": "checkpoint", "interval_epochs": int(train.checkpoint_interval),
                                      "interval_steps": int(train.checkpoint_steps),
                                      "interval_minutes": float(train.checkpoint_minutes)}))
    callbacks.append(CALLBACKS.build({"type": "logger", "progress": str(cfg.runtime.progress),
                                      "log_interval": int(train.log_interval),
                                      "tensorboard": bool(cfg.runtime.tensorboard), "plot": bool(cfg.runtime.plot)}))
    for node in to_container(train.callbacks) or []:
        callbacks.append(CALLBACKS.build(node, model=model))
    return callbacks, ema


def resume_path(resume: Any, run_dir: Path, is_main: bool) -> Path | None:
    """The checkpoint ``train.resume`` continues from, or None. Called once, on every rank.

    ``auto`` is decided on rank 0 and broadcast: ranks whose view of ``runtime.output_dir`` differs (a file
    system that shows a new file to one node before another) still all start from the same state, and when a
    rank cannot read the file rank 0 chose, every rank stops with an error naming it.
    """
    if not resume:
        return None
    if str(resume) == "auto":
        found = find_last_checkpoint(run_dir) if is_main else None
        chosen = du.broadcast_object(str(found) if found is not None else None)
        if chosen is None:
            log.info("train.resume=auto: no checkpoint_last.pth in %s, starting from scratch", run_dir)
            return None
        path = Path(chosen)
        blind = [rank for rank, seen in enumerate(du.all_gather_object(path.is_file())) if not seen]
        if blind:
            raise CheckpointError(f"train.resume=auto: rank 0 resumes from {path}, but rank(s) "
                                  f"{', '.join(map(str, blind))} cannot see that file; runtime.output_dir must be "
                                  "on a file system every node shares")
        return path
    path = Path(os.path.expanduser(str(resume)))
    if not path.is_file():
        raise CheckpointError(f"train.resume: checkpoint not found: {path}")
    return path


def check_compatible(ckpt: Mapping[str, Any], path: Path, model_type: str | None, classes: Sequence[str]) -> None:
    """A :class:`CheckpointError` when the checkpoint at ``path`` was trained with another model type or classes."""
    old_cfg = ckpt.get("config") or {}
    old_type = (old_cfg.get("model") or {}).get("type") if isinstance(old_cfg, Mapping) else None
    if old_type and model_type and old_type != model_type:
        raise CheckpointError(f"{path} was trained with model type {old_type!r}, but this config builds "
                              f"{model_type!r}")
    old_classes = ckpt.get("classes")
    if old_classes is not None and classes and list(old_classes) != list(classes):
        raise CheckpointError(
            f"{path} was trained on {len(old_classes)} classes ({', '.join(map(str, old_classes[:8]))}"
            f"{', ...' if len(old_classes) > 8 else ''}) but the data set has {len(classes)} "
            f"({', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''}); to start from its "
            f"weights with other classes use train.finetune_from={path} instead of train.resume")
