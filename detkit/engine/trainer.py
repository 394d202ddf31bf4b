"""The training loop: single process or DDP, exact resume, evaluation, divergence handling.

``train(cfg)`` builds everything from a composed config and runs :class:`Trainer`. The order of things:

1. plugins configured (``plugins.disable`` / ``plugins.imports``), process group started, output directory checked;
2. data sets built (a missing root fails here, before any step), ``model.num_classes`` filled from the data set
   when the config leaves it unset;
3. model, AdamW over the model's ``param_groups(train)``, per-step lr schedule, EMA / checkpoint / logger callbacks;
4. pretrained weights (``model.init_from`` / ``train.finetune_from``, ``model.backbone.weights``; see
   :mod:`detkit.weights.apply`) or ``train.resume`` applied (checked against the model and the classes first);
5. epochs of steps; after each epoch an evaluation (COCO metrics), ``checkpoint_last.pth`` and, when the chosen
   metric improved, ``checkpoint_best.pth``.

Reproducibility: the sample order and each sample's augmentation are functions of ``(seed, epoch, index)`` (see
:mod:`detkit.engine.sampling`), and the model's random streams (drop path, dropout) are re-seeded from
``(seed, rank, step)`` at every optimizer step. A checkpoint therefore pins the whole future of the run, and
resuming from any ``checkpoint_last.pth`` (written at step granularity) reproduces the uninterrupted run; on CPU in
``train.deterministic`` mode bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

import detkit
from detkit import plugins
from detkit.config import for_device, save_resolved, to_container
from detkit.data.report import CountedLoader, CountingCollate, DataReport
from detkit.engine import distributed as du
from detkit.engine.device import fallback_reason
from detkit.engine.checkpoint import capture_rng, find_last_checkpoint, restore_rng
from detkit.engine.evaluator import evaluate
from detkit.engine.optim import build_optimizer, build_scheduler
from detkit.engine.precision import configure_tf32
from detkit.engine.sampling import EpochBatchSampler, SeededDataset, sample_seed
from detkit.errors import CheckpointError, ConfigError, DetkitError
from detkit.registry import CALLBACKS
from detkit.weights.io import load_checkpoint_file, remove_stale_temp_files, save_checkpoint
from detkit.weights.state import load_state_dict

log = logging.getLogger("detkit.train")

AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class DivergenceError(DetkitError):
    """Training produced non-finite losses or gradients for ``train.max_bad_steps`` consecutive steps."""


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


def _to_device(targets: Sequence[Mapping[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
            for t in targets]


def _to_float(obj: Any) -> Any:
    """Cast every floating tensor of a (nested) model output to fp32, so losses and matching run in fp32."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, Mapping):
        return {k: _to_float(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_float(v) for v in obj)
    return obj


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


def with_num_classes(cfg: DictConfig, classes: Sequence[str]) -> DictConfig:
    """``cfg`` with ``model.num_classes`` set to ``len(classes)`` when the config leaves it unset or null.

    An explicit value smaller than the data set's class count is an error (labels would fall outside the head).
    """
    model = cfg.get("model") or {}
    current = model.get("num_classes") if isinstance(model, Mapping) or OmegaConf.is_config(model) else None
    if current is not None:
        if int(current) < len(classes):
            raise ConfigError(f"model.num_classes={current} but the data set has {len(classes)} classes "
                              f"({', '.join(list(classes)[:10])}{', ...' if len(classes) > 10 else ''}); "
                              "remove model.num_classes to follow the data set")
        return cfg
    tree = to_container(cfg)
    tree.setdefault("model", {})["num_classes"] = len(classes)
    new = OmegaConf.create(tree)
    OmegaConf.set_readonly(new, True)
    return new


def _with(cfg: DictConfig, key: str, value: Any) -> DictConfig:
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


class Trainer:
    """Trains ``cfg.model`` on ``cfg.data`` with the schedule in ``cfg.train``.

    Attributes useful to hooks: ``cfg``, ``model`` (DDP-wrapped when distributed), ``unwrapped_model``,
    ``optimizer``, ``scheduler``, ``ema`` (the EMA callback or None), ``run_dir``, ``epoch`` (epoch in progress, or
    the next one between epochs), ``current_epoch``, ``step`` (optimizer steps done), ``step_in_epoch``,
    ``steps_per_epoch``, ``total_steps``, ``is_main``, ``rank``, ``world_size``, ``classes``, ``cat_ids`` (the
    training data set's category id of each label, or None), ``best`` (best metric so far), ``last_eval``,
    ``last_step_ok``, ``last_grad_norm``.

    :param datasets: ``(train_ds, val_ds)`` to use instead of building them from ``cfg.data`` (tests, notebooks).
    """

    def __init__(self, cfg: DictConfig, datasets: tuple[Dataset | None, Dataset | None] | None = None) -> None:
        self.cfg = cfg
        self._callbacks: list[Any] = []
        self._registered: list[Any] = []
        self._file_handler: logging.Handler | None = None
        self.stopping = False
        self.stop_reason = ""
        try:
            self._setup(datasets)
        except BaseException:
            self._close_log_file()
            raise

    # -----------------------------------------------------------------------------------------------------------
    # set-up
    # -----------------------------------------------------------------------------------------------------------
    def _setup(self, datasets: tuple[Dataset | None, Dataset | None] | None) -> None:
        cfg = self.cfg
        tc, rc = cfg.train, cfg.runtime
        plugins.configure(cfg.plugins.disable, cfg.plugins.imports)
        self._check_train_config()
        info = du.init_distributed(rc.device, rc.dist_backend, rc.dist_timeout_s)
        self.dist = info
        self.rank, self.world_size, self.device = info.rank, info.world_size, info.device
        self.is_main = info.is_main
        self.cfg = cfg = for_device(cfg, self.device.type)  # runtime.cpu settings when the run is on the CPU
        tc, rc = cfg.train, cfg.runtime
        if rc.threads > 0:
            torch.set_num_threads(int(rc.threads))
        set_deterministic(bool(tc.deterministic))
        configure_tf32(bool(rc.tf32))

        self.run_dir = Path(os.path.expanduser(str(rc.output_dir)))
        problem = None
        if self.is_main:
            try:
                check_writable(self.run_dir)
            except ConfigError as e:
                problem = str(e)
        problem = du.broadcast_object(problem)
        if problem:
            raise ConfigError(problem)
        if self.is_main:
            self._file_handler = RunLogHandler(self.run_dir / "train.log", encoding="utf-8")
            self._file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logging.getLogger("detkit").addHandler(self._file_handler)
            for tmp in remove_stale_temp_files(self.run_dir):  # left by a run killed while saving
                log.info("removed %s, the partial checkpoint of an interrupted write", tmp)
            fell_back = fallback_reason() if str(rc.device) == "auto" and self.device.type == "cpu" else None
            log.info("device %s (runtime.device=%s%s), %d torch threads, data.num_workers=%d%s", self.device,
                     rc.device, f", {self.world_size} processes, {info.backend}" if self.world_size > 1 else "",
                     torch.get_num_threads(), int(cfg.data.num_workers),
                     f"; on the CPU because {fell_back}" if fell_back else "")

        # data first: a missing root or bad annotation file fails before anything heavy
        if datasets is None:
            from detkit.data.build import build_datasets
            from detkit.engine.recipe import without_pending_transforms

            train_ds, val_ds = build_datasets(without_pending_transforms(to_container(cfg.data)), train=True)
        else:
            train_ds, val_ds = datasets
        if train_ds is None or len(train_ds) == 0:  # type: ignore[arg-type]
            raise ConfigError("the training split is empty: nothing to train on (check data.root and data.train_split)")
        self.train_ds, self.val_ds = train_ds, val_ds
        self.classes = [str(c) for c in getattr(train_ds, "classes", [])]
        if val_ds is not None and getattr(val_ds, "classes", None) is not None \
                and [str(c) for c in val_ds.classes] != self.classes:
            raise ConfigError("the training and validation splits have different class lists")
        self.cat_ids = dataset_cat_ids(train_ds, len(self.classes))
        if self.classes:
            self.cfg = cfg = with_num_classes(cfg, self.classes)
        self.recipe = self._follow_the_data(train_ds, val_ds)
        cfg = self.cfg
        tc = cfg.train

        self.collate_fn = getattr(train_ds, "collate_fn", None)
        if self.collate_fn is None:
            from detkit.data.collate import collate

            self.collate_fn = collate

        # model
        seed_everything(int(tc.seed))  # the same initial weights on every rank
        from detkit.models.build import build_model

        model = build_model(cfg.model)
        model.to(self.device)
        self.unwrapped_model = model
        self.criterion = model.criterion
        self.amp_dtype = AMP_DTYPES[str(tc.amp)]
        if self.amp_dtype is torch.float16 and self.device.type != "cuda":
            raise ConfigError("train.amp=fp16 needs a GPU; use bf16 or none on CPU")

        # loop geometry
        self.batch_size = int(tc.batch_size)
        drop_last = len(train_ds) >= self.batch_size * self.world_size  # type: ignore[arg-type]
        self.sampler = EpochBatchSampler(len(train_ds), self.batch_size, seed=int(tc.seed), shuffle=True,  # type: ignore[arg-type]
                                         drop_last=drop_last, rank=self.rank, world_size=self.world_size)
        self.accumulate = int(tc.accumulate)
        self.batches_per_epoch = self.sampler.num_batches()
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.accumulate)
        self.total_steps = self.steps_per_epoch * int(tc.epochs)
        if tc.max_steps > 0:
            self.total_steps = min(self.total_steps, int(tc.max_steps))

        train_dict = to_container(tc)
        self.optimizer = build_optimizer(model, train_dict)
        self.scheduler = build_scheduler(self.optimizer, train_dict, self.steps_per_epoch,
                                         self.steps_per_epoch * int(tc.epochs))
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype is torch.float16 else None

        # state
        self.epoch = 0
        self.current_epoch = 0
        self.step = 0
        self.batch_in_epoch = 0
        self.step_in_epoch = 0
        self.bad_steps = 0
        self.skipped_steps = 0  # all skipped steps of the run (bad_steps counts the consecutive ones)
        self.last_skip_reason = ""
        self.last_step_ok = True
        self.last_grad_norm = float("nan")
        self.best: dict[str, Any] = {"metric": str(tc.best_metric), "value": None, "epoch": None}
        self.best_improved_at: int | None = None
        self.evals_without_improvement = 0
        self.last_eval: dict[str, float] = {}
        self.finetune_report: Any = None
        self.planned_epochs = int(tc.epochs)
        self.train_seconds = 0.0  # training time of earlier sessions of this run (resume), for train.max_minutes
        self._clock: float | None = None
        self._fit_marks: list[tuple[int, float]] = []  # (step, elapsed) for train.max_minutes
        self._eval_seconds: list[float] = []

        if tc.finetune_from and tc.resume:
            raise ConfigError("set train.finetune_from or train.resume, not both (resume continues a run; "
                              "finetune_from starts a new one from other weights)")
        self.pretrained: list[dict[str, Any]] = []  # where the starting weights came from (run dir, checkpoints)
        self.resume_from = self._resume_path()  # on every rank (it may broadcast), before the pretrained weights
        self._load_pretrained()

        # callbacks (EMA first: the checkpoint callback saves what it holds; the running statistics of the norm
        # layers are put back after a skipped step before any of them looks at the model)
        self._callbacks.append(CALLBACKS.build({"type": "running_stats"}, model=model))
        self.ema = None
        if tc.ema:
            self.ema = CALLBACKS.build({"type": "ema", "decay": float(tc.ema_decay), "tau": int(tc.ema_tau)},
                                       model=model)
            self._callbacks.append(self.ema)
        self._callbacks.append(CALLBACKS.build({"type": "checkpoint", "interval_epochs": int(tc.checkpoint_interval),
                                                "interval_steps": int(tc.checkpoint_steps),
                                                "interval_minutes": float(tc.checkpoint_minutes)}))
        self._callbacks.append(CALLBACKS.build({"type": "logger", "progress": str(cfg.runtime.progress),
                                                "log_interval": int(tc.log_interval),
                                                "tensorboard": bool(cfg.runtime.tensorboard),
                                                "plot": bool(cfg.runtime.plot)}))
        for node in to_container(tc.callbacks) or []:
            self._callbacks.append(CALLBACKS.build(node, model=model))

        if self.resume_from is not None:
            self._resume(self.resume_from)

        if self.world_size > 1:
            if cfg.runtime.sync_bn:  # in place: the optimizer, EMA and callbacks keep the same tensors
                du.convert_sync_batchnorm(model, self.device)
            self.model: nn.Module = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(cfg.runtime.find_unused_parameters))
        else:
            self.model = model

        if self.is_main:
            save_resolved(self.cfg, self.run_dir)
            (self.run_dir / "plugins.json").write_text(json.dumps(plugins.loaded_plugins(), indent=2))
            (self.run_dir / "classes.json").write_text(json.dumps(self.classes, indent=2))
            if self.pretrained:
                (self.run_dir / "pretrained.json").write_text(json.dumps(self.pretrained, indent=2))

    def _check_train_config(self) -> None:
        tc = self.cfg.train
        problems = []
        if tc.amp not in AMP_DTYPES:
            problems.append(f"train.amp must be one of {', '.join(AMP_DTYPES)}, got {tc.amp!r}")
        for key in ("epochs", "batch_size", "accumulate", "max_bad_steps"):
            if tc[key] is not None and int(tc[key]) < 1:  # None: derived from the data (checked again after)
                problems.append(f"train.{key} must be >= 1, got {tc[key]}")
        if tc.max_minutes < 0:
            problems.append(f"train.max_minutes must be >= 0, got {tc.max_minutes}")
        if problems:
            raise ConfigError("; ".join(problems))

    def _follow_the_data(self, train_ds: Any, val_ds: Any) -> Any:
        """Fill the config's ``null`` derived keys from the training split (:mod:`detkit.engine.recipe`), log each
        choice with its reason once and warn where the data and explicit values disagree; set the derived
        transforms on the data sets."""
        from detkit.data.transforms import build_transforms
        from detkit.engine.recipe import apply_recipe, data_stats, derive_recipe, pending_keys

        tree = to_container(self.cfg)
        pending = pending_keys(tree)
        stats = data_stats(train_ds)
        if stats is None:
            if pending:
                raise ConfigError(f"{', '.join(pending)} null: derived from the data, but this data set has no "
                                  "annotations(i) / image_info(i) to derive them from; set them")
            return None
        recipe = derive_recipe(tree, stats, self.world_size)
        if self.is_main:
            for warning in recipe.warnings:
                log.warning("data: %s", warning)
            for choice in recipe.choices:
                log.info("derived %s", choice)
        if recipe.choices:
            new = OmegaConf.create(apply_recipe(tree, recipe))
            OmegaConf.set_readonly(new, True)
            self.cfg = new
            self._check_train_config()
        still = [k for k in pending_keys(to_container(self.cfg))]
        if still:
            raise ConfigError(f"{', '.join(still)} null but not derivable for this config (a derived input size "
                              "needs lwdetr_train / lwdetr_val transforms); set them")
        for key, dataset in (("train_transforms", train_ds), ("val_transforms", val_ds)):
            if dataset is not None and any(k.startswith(f"data.{key}.") for k in pending):
                dataset.transforms = build_transforms(to_container(self.cfg.data[key]))
        return recipe

    def _resume_path(self) -> Path | None:
        """The checkpoint ``train.resume`` continues from, or None. Called once, on every rank.

        ``auto`` is decided on rank 0 and broadcast: ranks whose view of ``runtime.output_dir`` differs (a file
        system that shows a new file to one node before another) still all start from the same state, and when a
        rank cannot read the file rank 0 chose, every rank stops with an error naming it.
        """
        resume = self.cfg.train.resume
        if not resume:
            return None
        if str(resume) == "auto":
            found = find_last_checkpoint(self.run_dir) if self.is_main else None
            chosen = du.broadcast_object(str(found) if found is not None else None)
            if chosen is None:
                log.info("train.resume=auto: no checkpoint_last.pth in %s, starting from scratch", self.run_dir)
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

    # -----------------------------------------------------------------------------------------------------------
    # checkpoints
    # -----------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly."""
        return {
            "model": self.unwrapped_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.step,
            "bad_steps": self.bad_steps,
            "skipped_steps": self.skipped_steps,
            "best": dict(self.best),
            "evals_without_improvement": self.evals_without_improvement,
            "rng": capture_rng(),
            "config": to_container(self.cfg),
            "classes": list(self.classes),
            "cat_ids": list(self.cat_ids) if self.cat_ids is not None else None,
            "plugins": plugins.loaded_plugins(),
            "pretrained": list(self.pretrained),
            "world_size": self.world_size,
            "train_seconds": self.elapsed_training(),
            "total_steps": self.total_steps,
            "detkit_version": detkit.__version__,
        }

    def save_checkpoint(self, name: str = "checkpoint_last.pth") -> Path | None:
        """Write the training state to ``run_dir/name`` atomically (rank 0 only; other ranks return None)."""
        if not self.is_main:
            return None
        path = save_checkpoint(self.state_dict(), self.run_dir / name)
        log.debug("saved %s (epoch %d, step %d)", path, self.epoch, self.step)
        return path

    def _check_compatible(self, ckpt: Mapping[str, Any], path: Path) -> None:
        old_cfg = ckpt.get("config") or {}
        old_type = (old_cfg.get("model") or {}).get("type") if isinstance(old_cfg, Mapping) else None
        new_type = self.cfg.model.get("type")
        if old_type and new_type and old_type != new_type:
            raise CheckpointError(f"{path} was trained with model type {old_type!r}, but this config builds "
                                  f"{new_type!r}")
        old_classes = ckpt.get("classes")
        if old_classes is not None and self.classes and list(old_classes) != self.classes:
            raise CheckpointError(
                f"{path} was trained on {len(old_classes)} classes ({', '.join(map(str, old_classes[:8]))}"
                f"{', ...' if len(old_classes) > 8 else ''}) but the data set has {len(self.classes)} "
                f"({', '.join(self.classes[:8])}{', ...' if len(self.classes) > 8 else ''}); to start from its "
                f"weights with other classes use train.finetune_from={path} instead of train.resume")

    def _resume(self, path: Path) -> None:
        ckpt = load_checkpoint_file(path, map_location=self.device)
        self._check_compatible(ckpt, path)
        if "model" not in ckpt:
            raise CheckpointError(f"{path} has no 'model' entry")
        load_state_dict(self.unwrapped_model, ckpt["model"], strict=True, source=str(path))
        if ckpt.get("optimizer") is not None:
            try:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{path}: the optimizer state does not fit this model's parameter groups "
                                      f"({e})") from e
        if ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.ema is not None:
            if ckpt.get("ema"):
                self.ema.load_state_dict(ckpt["ema"])
            else:
                log.warning("%s has no EMA weights; the EMA restarts from the loaded model", path)
                self.ema.module.load_state_dict(self.unwrapped_model.state_dict())
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = int(ckpt.get("epoch", 0))
        self.batch_in_epoch = int(ckpt.get("batch_in_epoch", 0))
        self.step = int(ckpt.get("step", 0))
        self.bad_steps = int(ckpt.get("bad_steps", 0))
        self.skipped_steps = int(ckpt.get("skipped_steps", 0))
        self.best.update(ckpt.get("best") or {})
        self.evals_without_improvement = int(ckpt.get("evals_without_improvement", 0))
        self.pretrained = list(ckpt.get("pretrained") or self.pretrained)
        self.train_seconds = float(ckpt.get("train_seconds") or 0.0)
        if float(self.cfg.train.max_minutes) > 0 and ckpt.get("total_steps"):
            self.total_steps = int(ckpt["total_steps"])  # as fitted to the time budget (the scheduler agrees)
            self.planned_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        if ckpt.get("rng"):
            restore_rng(ckpt["rng"])
        if ckpt.get("world_size", self.world_size) != self.world_size:
            log.warning("%s was written by a run with %s processes, this one has %d: the sample order differs "
                        "from here on", path, ckpt.get("world_size"), self.world_size)
        log.info("resumed from %s: epoch %d, batch %d, step %d", path, self.epoch, self.batch_in_epoch, self.step)

    def _load_pretrained(self) -> None:
        """``model.init_from`` / ``train.finetune_from`` (a whole detector; class-head rows matched by class name)
        and ``model.backbone.weights``, applied by :func:`detkit.weights.apply.apply_pretrained` before the EMA
        copy is made. Skipped when resuming: the checkpoint holds the weights. Under DDP rank 0 loads first (filling
        the URL cache) while the other ranks wait, so a URL is downloaded once, not by every rank at the same time."""
        from detkit.weights import apply as pretrained

        tc = self.cfg.train
        finetune = str(tc.finetune_from) if tc.finetune_from else None
        if not finetune and not pretrained.has_pretrained(self.cfg.model):
            return
        if self.resume_from is not None:
            log.info("resuming: the config's pretrained weights are not loaded (the checkpoint holds the weights)")
            return
        with du.main_process_first():  # rank 0 downloads URLs into the cache while the other ranks wait
            reports = pretrained.apply_pretrained(self.unwrapped_model, self.cfg.model,
                                                  classes=self.classes or None, init_from_override=finetune,
                                                  progress=self.is_main, quiet=not self.is_main)
        self.pretrained = [r.as_dict() for r in reports]
        self.finetune_report = next((r for r in reports if r.target == "model"), None)
        if self.is_main and finetune and self.finetune_report is not None:
            (self.run_dir / "finetune_report.json").write_text(json.dumps(self.finetune_report.as_dict(), indent=2))

    # -----------------------------------------------------------------------------------------------------------
    # the loop
    # -----------------------------------------------------------------------------------------------------------
    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer.param_groups else 0.0

    def _hook(self) -> Any:
        return plugins.plugin_manager().hook

    def _register_callbacks(self) -> None:
        pm = plugins.plugin_manager()
        for cb in self._callbacks:
            if not pm.is_registered(cb):
                pm.register(cb)
                self._registered.append(cb)

    def _unregister_callbacks(self) -> None:
        pm = plugins.plugin_manager()
        for cb in self._registered:
            if pm.is_registered(cb):
                pm.unregister(cb)
        self._registered.clear()

    def _train_loader(self) -> CountedLoader:
        """The training batches; data problems counted in the workers come back with them (see
        :mod:`detkit.data.report`), so the data report is the same for any ``data.num_workers``."""
        workers = int(self.cfg.data.num_workers)
        loader = DataLoader(SeededDataset(self.train_ds), batch_sampler=self.sampler, num_workers=workers,
                            collate_fn=CountingCollate(self.collate_fn), pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(int(self.cfg.train.seed)),
                            persistent_workers=workers > 0)
        return CountedLoader(loader, getattr(self.train_ds, "report", None))

    def _write_data_report(self, final: bool = False, quiet: bool = False) -> None:
        """``data_report.json`` in the run directory: every problem of the training and validation data sets,
        counted while building them and while reading images in any process. A report that changed since it was
        last written is logged (its one-line summary; ``quiet``: not now, the data set logged it when it was built);
        at the end of the run (``final``) it is logged in any case."""
        if not self.is_main:
            return
        reports = {split: ds.report for split, ds in (("train", self.train_ds), ("val", self.val_ds))
                   if isinstance(getattr(ds, "report", None), DataReport)}
        if not reports:
            return
        current = {split: report.as_dict() for split, report in reports.items()}
        path = self.run_dir / "data_report.json"
        try:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(current, indent=2))
            os.replace(tmp, path)
        except OSError as e:  # not fatal: a full disk stops the run where it matters (checkpoints, metrics)
            if not self._data_report_unwritable:
                log.warning("cannot write %s: %s; the data report is in the log only", path, e.strerror or e)
            self._data_report_unwritable = True
        for split, report in reports.items():
            if final or (not quiet and current[split] != self._logged_data_reports.get(split)):
                report.log_summary()
        self._logged_data_reports = current

    def fit(self) -> dict[str, float]:
        """Run training to the end (or early stop / ``max_steps``) and return the final evaluation metrics."""
        self._register_callbacks()
        ok = False
        try:
            self._hook().detkit_train_start(trainer=self)
            metrics = self._loop()
            self._hook().detkit_train_end(trainer=self, metrics=metrics)
            ok = True
            return metrics
        finally:
            if not ok:
                for cb in self._callbacks:
                    close = getattr(cb, "close", None)
                    if callable(close):
                        close()
            self._unregister_callbacks()
            self._close_log_file()

    def _close_log_file(self) -> None:
        if self._file_handler is not None:
            logging.getLogger("detkit").removeHandler(self._file_handler)
            self._file_handler.close()
            self._file_handler = None

    def _loop(self) -> dict[str, float]:
        tc = self.cfg.train
        loader = self._train_loader()
        self._logged_data_reports: dict[str, Any] = {}
        self._data_report_unwritable = False
        self._write_data_report(quiet=True)
        evaluated_last = False
        self._clock = time.monotonic()
        while self.epoch < self.planned_epochs and not self.stopping:
            epoch = self.current_epoch = self.epoch
            self.sampler.set_epoch(epoch, start_batch=self.batch_in_epoch)
            self.step_in_epoch = math.ceil(self.batch_in_epoch / self.accumulate)
            sums: dict[str, float] = {}
            n_ok = 0
            for losses in self._epoch_steps(loader):
                if self.last_step_ok:
                    n_ok += 1
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0.0) + v
                if tc.max_steps > 0 and self.step >= tc.max_steps:
                    self.stopping, self.stop_reason = True, f"train.max_steps={tc.max_steps} reached"
                    break
                if tc.max_minutes > 0 and self._time_is_up():
                    break
            epoch_done = self.batch_in_epoch >= self.batches_per_epoch
            evaluated_last = False
            if epoch_done:
                last = epoch + 1 >= self.planned_epochs
                interval = int(self.cfg.train.eval_interval)
                if interval >= 0 and (last or (interval > 0 and (epoch + 1) % interval == 0)):
                    self._evaluate(epoch)
                    evaluated_last = True
                if tc.max_minutes > 0 and not last:
                    self._fit_to_time()  # with the step time so far and the cost of an evaluation
                self.epoch, self.batch_in_epoch, self.step_in_epoch = epoch + 1, 0, 0
                metrics = {f"train_{k}": v / max(n_ok, 1) for k, v in sums.items()}
                metrics["lr"] = self.current_lr()
                metrics.update({f"val_{k}": v for k, v in self.last_eval.items()} if evaluated_last else {})
                self._write_data_report()
                self._hook().detkit_after_epoch(trainer=self, epoch=epoch, metrics=metrics)
            elif self.is_main:  # stopped inside an epoch: keep the exact position
                self.save_checkpoint("checkpoint_last.pth")
        if self.stop_reason:
            log.info("stopping: %s", self.stop_reason)
        if not evaluated_last and int(self.cfg.train.eval_interval) >= 0:
            self._evaluate(self.current_epoch)
        self._write_data_report(final=True)
        return dict(self.last_eval)

    # -----------------------------------------------------------------------------------------------------------
    # train.max_minutes
    # -----------------------------------------------------------------------------------------------------------
    FIT_AFTER_STEPS = 8  # steps timed (after the first, which is slower) before the schedule is fitted

    def elapsed_training(self) -> float:
        """Seconds of training (steps and evaluations) of this run so far, earlier sessions included."""
        return self.train_seconds + (time.monotonic() - self._clock if self._clock is not None else 0.0)

    def _time_is_up(self) -> bool:
        """After each step: fit the schedule once the first steps are timed; stop (``stopping``) at the budget or at
        the fitted number of steps. Every rank decides the same (rank 0's clock)."""
        budget = float(self.cfg.train.max_minutes) * 60
        self._fit_marks.append((self.step, self.elapsed_training()))
        if len(self._fit_marks) == self.FIT_AFTER_STEPS + 1:
            self._fit_to_time()
        over = du.broadcast_object(self.elapsed_training() >= budget) if du.is_dist() else \
            self.elapsed_training() >= budget
        if over or self.step >= self.total_steps:
            self.stopping = True
            self.stop_reason = (f"train.max_minutes={self.cfg.train.max_minutes:g} reached after {self.step} steps"
                                f" ({self.elapsed_training() / 60:.1f} min)")
        return self.stopping

    def _fit_to_time(self) -> None:
        """Fit the run (total steps, lr schedule, epochs, a derived evaluation interval) to what is left of
        ``train.max_minutes``, from the measured step time and the evaluations so far."""
        if len(self._fit_marks) < 2:
            return
        (s0, t0), (s1, t1) = self._fit_marks[1], self._fit_marks[-1]
        evals = sum(self._eval_seconds)
        step_time = max((t1 - t0 - evals) / max(s1 - s0, 1), 1e-6) if s1 > s0 else None
        if step_time is None:
            return
        tc = self.cfg.train
        left = float(tc.max_minutes) * 60 - self.elapsed_training()
        eval_time = (sum(self._eval_seconds) / len(self._eval_seconds)) if self._eval_seconds else 0.0
        interval = int(tc.eval_interval or 0)
        epochs_left = max(self.planned_epochs - self.epoch, 1)
        evals_left = 1 + (epochs_left // interval if interval > 0 else 0)
        steps_left = max(int((left - eval_time * evals_left) / step_time), 1)
        planned = self.steps_per_epoch * int(tc.epochs)
        total = min(planned, self.step + steps_left)
        if self.world_size > 1:
            total = int(du.broadcast_object(total))
        if total == self.total_steps:
            return
        self.total_steps = total
        self.planned_epochs = max(math.ceil(total / self.steps_per_epoch), self.epoch + 1)
        derived = getattr(self, "recipe", None)
        for factor in getattr(self.scheduler, "lr_lambdas", []):
            if hasattr(factor, "fit"):
                factor.fit(total)
                if derived is not None and derived.value("train.warmup_iters") is not None:
                    from detkit.engine.recipe import warmup_for

                    factor.warmup_iters = max(min(warmup_for(total), factor.warmup_iters), 1)  # not past it
        if derived is not None and derived.value("train.eval_interval") is not None:
            from detkit.engine.recipe import eval_interval_for

            self.cfg = _with(self.cfg, "train.eval_interval", eval_interval_for(self.planned_epochs))
        if self.is_main:
            log.info("train.max_minutes=%g: %.2f s per step, schedule fitted to %d steps (%d epochs)",
                     float(tc.max_minutes), step_time, total, self.planned_epochs)

    def _epoch_steps(self, loader: DataLoader):  # -> Iterator[dict[str, float]]
        """Yield the rank-averaged losses of each optimizer step of the current epoch."""
        model = self.model
        model.train()
        window: list[Any] = []
        remaining = self.batches_per_epoch - self.batch_in_epoch
        for batch in loader:
            window.append(batch)
            remaining -= 1
            if len(window) == self.accumulate or remaining == 0:
                self.batch_in_epoch += len(window)  # before the step's hooks, which may checkpoint
                losses = self._optimizer_step(window)
                window = []
                yield losses

    def _optimizer_step(self, window: list[Any]) -> dict[str, float]:
        """One optimizer step over the micro-batches of ``window``; returns the rank-averaged losses.

        Every micro-batch runs forward and backward, whatever its loss, so that all ranks issue the same collectives;
        whether the step is taken is decided once, after the backward passes, from one all-reduced vector (non-finite
        loss flag, gradient norm, logged losses) that is read to the host once: a single host synchronisation per
        optimizer step for the check and the logging. A step is skipped (no weight, optimizer-state or EMA change)
        when a loss or the gradient is not finite; under fp16 with a GradScaler a step the scaler skips for
        overflow is counted the same way, and the scaler still lowers its scale.
        """
        tc = self.cfg.train
        step_seed = sample_seed(int(tc.seed), 1_000_000 + self.rank, self.step)
        seed_everything(step_seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(step_seed)
        logged: dict[str, torch.Tensor] = {}
        for i, (images, mask, targets) in enumerate(window):
            images = images.to(self.device, non_blocking=True)
            mask = mask.to(self.device, non_blocking=True)
            targets = _to_device(targets, self.device)
            sync = i == len(window) - 1
            ctx = self.model.no_sync() if (self.world_size > 1 and not sync) else contextlib.nullcontext()
            with ctx:
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    outputs = self.model(images, mask)
                with torch.autocast(self.device.type, enabled=False):
                    losses = self.criterion(_to_float(outputs), targets)
                loss = losses["loss"]
                for k, v in losses.items():
                    if isinstance(v, torch.Tensor) and v.numel() == 1 and (k == "loss" or k.startswith("loss_")
                                                                           or v.dtype.is_floating_point):
                        logged[k] = logged.get(k, 0.0) + v.detach().float().reshape(()) / len(window)
                scaled = loss / len(window)
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # no host sync: the overflow shows in the gradient norm below
        max_norm = float(tc.clip_max_norm) if tc.clip_max_norm > 0 else float("inf")
        norm = (torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True) if params
                else torch.zeros((), device=self.device))
        keys = sorted(logged)
        zero = torch.zeros((), device=self.device)
        loss_bad = (~torch.isfinite(logged["loss"])).float() if "loss" in logged else zero
        stats = torch.stack([loss_bad.reshape(()).to(self.device), norm.detach().float().reshape(()).to(self.device),
                             *[torch.as_tensor(logged[k], device=self.device).reshape(()) for k in keys]])
        du.all_reduce(stats, "mean")  # the gradients are already reduced, so the norm's mean is the norm
        host = stats.tolist()  # the step's one host synchronisation
        loss_ok, self.last_grad_norm = host[0] == 0.0, float(host[1])
        values = dict(zip(keys, host[2:]))
        grad_ok = math.isfinite(self.last_grad_norm)
        bad = not (loss_ok and grad_ok)
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()  # lowers the scale after an overflow (the inf check was recorded by unscale_)
            self.bad_steps += 1
            self.skipped_steps += 1
            self.last_skip_reason = ("loss" if not loss_ok else "scaler overflow" if self.scaler is not None
                                     else "gradient")
            what = {"loss": "non-finite loss", "gradient": "non-finite gradient",
                    "scaler overflow": "fp16 gradient overflow (the GradScaler lowers its scale)"}
            log.warning("step %d: %s, step skipped (%d in a row, limit train.max_bad_steps=%d)",
                        self.step + 1, what[self.last_skip_reason], self.bad_steps, int(tc.max_bad_steps))
        else:
            self.optimizer.step()  # the scaler already unscaled the gradients and they are finite
            if self.scaler is not None:
                self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps = 0
            self.last_skip_reason = ""
        self.last_step_ok = not bad
        self.scheduler.step()
        self.step += 1
        self.step_in_epoch += 1
        self._hook().detkit_after_step(trainer=self, step=self.step, losses=values)
        if self.bad_steps >= int(tc.max_bad_steps):
            last = self.run_dir / "checkpoint_last.pth"
            keep = f"; the last good checkpoint is {last}" if last.is_file() else ""
            raise DivergenceError(
                f"training diverged: {self.bad_steps} consecutive steps with a non-finite loss or gradient "
                f"(train.max_bad_steps={int(tc.max_bad_steps)}) at epoch {self.current_epoch}, step {self.step}"
                f"{keep}. Try a lower train.lr, a smaller train.clip_max_norm, or train.amp=none.")
        return values

    # -----------------------------------------------------------------------------------------------------------
    # evaluation
    # -----------------------------------------------------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and selected: the EMA copy when ``train.ema`` is on."""
        return self.ema.module if self.ema is not None else self.unwrapped_model

    def _evaluate(self, epoch: int) -> dict[str, float]:
        if self.val_ds is None or len(self.val_ds) == 0:  # type: ignore[arg-type]
            return {}
        tc = self.cfg.train
        t0 = time.monotonic()
        metrics = evaluate(self.eval_model(), self.val_ds, batch_size=int(tc.eval_batch_size or tc.batch_size),
                           num_workers=int(self.cfg.data.num_workers), device=self.device,
                           collate_fn=self.collate_fn, amp_dtype=self.amp_dtype)
        metrics = dict(metrics)
        metrics["eval_time_s"] = round(time.monotonic() - t0, 2)
        self._eval_seconds.append(time.monotonic() - t0)
        self.last_eval = metrics
        key = str(tc.best_metric)
        if key not in metrics:
            raise ConfigError(f"train.best_metric={key!r} is not a COCO metric (choose from "
                              f"{', '.join(k for k in metrics if k != 'eval_time_s')})")
        value = float(metrics[key])
        if self.best.get("value") is None or value > float(self.best["value"]):
            self.best.update({"metric": key, "value": value, "epoch": epoch})
            self.best_improved_at = epoch
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
            patience = int(tc.early_stop_patience)
            if patience > 0 and self.evals_without_improvement >= patience:
                self.stopping = True
                self.stop_reason = (f"early stop: {key} did not improve for {patience} evaluations "
                                    f"(best {self.best['value']:.4f} at epoch {self.best['epoch']})")
        self._hook().detkit_after_eval(trainer=self, epoch=epoch, metrics=metrics)
        return metrics


def train(cfg: DictConfig, datasets: tuple[Dataset | None, Dataset | None] | None = None) -> dict[str, float]:
    """Train as ``cfg`` says and return the final evaluation metrics (``AP``, ``AP50``, ... on 0-1 scale).

    Under torchrun, a process group this call starts is also torn down by it (every rank waits for the others first
    unless an exception is leaving), so a script may simply call ``train`` and exit; a group the caller started is
    left alone."""
    caller_group = du.is_dist()
    try:
        return Trainer(cfg, datasets=datasets).fit()
    finally:
        if not caller_group:
            du.teardown()
