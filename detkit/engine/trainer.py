"""The training loop: single process or DDP, exact resume, evaluation, divergence handling.

``train(cfg)`` builds everything from a composed config and runs :class:`Trainer`. The order of things:

1. plugins configured (``plugins.disable`` / ``plugins.imports``), process group started, output directory checked;
2. data sets built (a missing root fails here, before any step), ``model.num_classes`` filled from the data set
   when the config leaves it unset;
3. model, AdamW over the parameter groups of :mod:`detkit.engine.optim`, per-step lr schedule, EMA / checkpoint /
   logger callbacks;
4. pretrained weights (``model.init_from`` / ``train.finetune_from``, ``model.backbone.weights``; see
   :mod:`detkit.weights.apply`) or ``train.resume`` applied (checked against the model and the classes first);
5. epochs of steps; after each epoch an evaluation (COCO metrics), ``checkpoint_last.pth`` and, when the chosen
   metric improved, ``checkpoint_best.pth``.

Reproducibility: the sample order and each sample's augmentation are functions of ``(seed, epoch, index)`` (see
:mod:`detkit.engine.sampling`), and the model's random streams (drop path, dropout) are re-seeded from
``(seed, rank, step)`` at every optimizer step. A checkpoint therefore pins the whole future of the run, and
resuming from any ``checkpoint_last.pth`` (written at step granularity) reproduces the uninterrupted run; on CPU in
``train.deterministic`` mode bit for bit.

Here: :class:`Trainer`'s set-up, one method per stage (their pieces in :mod:`detkit.engine.setup`), and its
checkpoints; the loop it runs is :class:`~detkit.engine.loop.TrainingLoop`, one step's parts :mod:`detkit.engine.step`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig
from torch.utils.data import Dataset

import detkit
from detkit import plugins
from detkit.config import for_device, save_resolved, to_container
from detkit.engine import distributed as du
from detkit.engine.device import fallback_reason
from detkit.engine.checkpoint import capture_rng, restore_rng
from detkit.engine.optim import build_optimizer, build_scheduler
from detkit.engine.precision import configure_tf32
from detkit.engine.loop import TrainingLoop
from detkit.engine.sampling import EpochBatchSampler
from detkit.engine.setup import (AMP_DTYPES, RunLogHandler, check_classes, check_compatible, check_train_config,
                                 check_writable, dataset_cat_ids, default_callbacks, follow_the_data, resume_path,
                                 seed_everything, set_deterministic, with_num_classes)
from detkit.engine.step import DivergenceError
from detkit.errors import CheckpointError, ConfigError
from detkit.weights.io import load_checkpoint_file, remove_stale_temp_files, save_checkpoint
from detkit.weights.state import load_state_dict

__all__ = ["DivergenceError", "RunLogHandler", "Trainer", "set_deterministic", "train", "with_num_classes"]

log = logging.getLogger("detkit.train")


class Trainer(TrainingLoop):
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
        """The stages of the module docstring, in order."""
        self._setup_runtime()  # 1. plugins, process group, device settings
        self._open_run_dir()  # 1. output directory, train.log
        self._setup_data(datasets)  # 2. data sets, classes, model.num_classes, keys derived from the data
        self._setup_model()  # 3. model, loop geometry, AdamW, lr schedule
        self._reset_progress()
        self._setup_weights()  # 4. the checkpoint to resume, else the pretrained weights
        self._setup_callbacks()  # 3. EMA / checkpoint / logger, after the weights (the EMA copies them)
        if self.resume_from is not None:
            self._resume(self.resume_from)  # 4.
        self._wrap_model()
        self._write_run_files()

    def _setup_runtime(self) -> None:
        """Plugins, the process group and the device's settings (``runtime.cpu`` on the CPU, threads, determinism)."""
        plugins.configure(self.cfg.plugins.disable, self.cfg.plugins.imports)
        check_train_config(self.cfg.train)
        rc = self.cfg.runtime
        info = du.init_distributed(rc.device, rc.dist_backend, rc.dist_timeout_s)
        self.dist = info
        self.rank, self.world_size, self.device = info.rank, info.world_size, info.device
        self.is_main = info.is_main
        self.cfg = cfg = for_device(self.cfg, self.device.type)  # runtime.cpu settings when the run is on the CPU
        if cfg.runtime.threads > 0:
            torch.set_num_threads(int(cfg.runtime.threads))
        set_deterministic(bool(cfg.train.deterministic))
        configure_tf32(bool(cfg.runtime.tf32))

    def _open_run_dir(self) -> None:
        """``runtime.output_dir`` checked writable on rank 0 (every rank stops if not), ``train.log`` opened there."""
        rc = self.cfg.runtime
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
        if not self.is_main:
            return
        self._file_handler = RunLogHandler(self.run_dir / "train.log", encoding="utf-8")
        self._file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("detkit").addHandler(self._file_handler)
        for tmp in remove_stale_temp_files(self.run_dir):  # left by a run killed while saving
            log.info("removed %s, the partial checkpoint of an interrupted write", tmp)
        fell_back = fallback_reason() if str(rc.device) == "auto" and self.device.type == "cpu" else None
        log.info("device %s (runtime.device=%s%s), %d torch threads, data.num_workers=%d%s", self.device,
                 rc.device, f", {self.world_size} processes, {self.dist.backend}" if self.world_size > 1 else "",
                 torch.get_num_threads(), int(self.cfg.data.num_workers),
                 f"; on the CPU because {fell_back}" if fell_back else "")

    def _setup_data(self, datasets: tuple[Dataset | None, Dataset | None] | None) -> None:
        """Data first: a missing root or bad annotation file fails before anything heavy."""
        if datasets is None:
            from detkit.data.build import build_datasets
            from detkit.engine.recipe import without_pending_transforms

            train_ds, val_ds = build_datasets(without_pending_transforms(to_container(self.cfg.data)), train=True)
        else:
            train_ds, val_ds = datasets
        if train_ds is None or len(train_ds) == 0:  # type: ignore[arg-type]
            raise ConfigError("the training split is empty: nothing to train on (check data.root and data.train_split)")
        self.train_ds, self.val_ds = train_ds, val_ds
        self.classes = check_classes(train_ds, val_ds)
        self.cat_ids = dataset_cat_ids(train_ds, len(self.classes))
        if self.classes:
            self.cfg = with_num_classes(self.cfg, self.classes)
        self.cfg, self.recipe = follow_the_data(self.cfg, train_ds, val_ds, self.world_size, self.is_main)
        self.collate_fn = getattr(train_ds, "collate_fn", None)
        if self.collate_fn is None:
            from detkit.data.collate import collate

            self.collate_fn = collate

    def _setup_model(self) -> None:
        """The model (the same initial weights on every rank), the loop geometry, AdamW and the lr schedule."""
        tc = self.cfg.train
        seed_everything(int(tc.seed))  # the same initial weights on every rank
        from detkit.models.build import build_model

        model = build_model(self.cfg.model)
        model.to(self.device)
        self.unwrapped_model = model
        self.criterion = model.criterion
        self.amp_dtype = AMP_DTYPES[str(tc.amp)]
        if self.amp_dtype is torch.float16 and self.device.type != "cuda":
            raise ConfigError("train.amp=fp16 needs a GPU; use bf16 or none on CPU")

        self.batch_size = int(tc.batch_size)
        samples = len(self.train_ds)  # type: ignore[arg-type]
        drop_last = samples >= self.batch_size * self.world_size
        self.sampler = EpochBatchSampler(samples, self.batch_size, seed=int(tc.seed), shuffle=True,
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

    def _reset_progress(self) -> None:
        """The counters of a run from scratch (a resume overwrites them)."""
        tc = self.cfg.train
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

    def _setup_weights(self) -> None:
        """The checkpoint ``train.resume`` continues from (``resume_from``), else the pretrained weights."""
        tc = self.cfg.train
        if tc.finetune_from and tc.resume:
            raise ConfigError("set train.finetune_from or train.resume, not both (resume continues a run; "
                              "finetune_from starts a new one from other weights)")
        self.pretrained: list[dict[str, Any]] = []  # where the starting weights came from (run dir, checkpoints)
        self.resume_from = self._resume_path()  # on every rank (it may broadcast), before the pretrained weights
        self._load_pretrained()

    def _setup_callbacks(self) -> None:
        """The default callbacks, then ``train.callbacks``; ``ema`` is the EMA callback or None."""
        callbacks, self.ema = default_callbacks(self.cfg, self.unwrapped_model)
        self._callbacks.extend(callbacks)

    def _wrap_model(self) -> None:
        """``model``: DDP around the model when distributed (SyncBatchNorm first with ``runtime.sync_bn``)."""
        model = self.unwrapped_model
        if self.world_size > 1:
            if self.cfg.runtime.sync_bn:  # in place: the optimizer, EMA and callbacks keep the same tensors
                du.convert_sync_batchnorm(model, self.device)
            self.model: nn.Module = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(self.cfg.runtime.find_unused_parameters))
        else:
            self.model = model

    def _write_run_files(self) -> None:
        """The resolved config, plugins, classes and pretrained sources in the run directory (rank 0)."""
        if self.is_main:
            save_resolved(self.cfg, self.run_dir)
            (self.run_dir / "plugins.json").write_text(json.dumps(plugins.loaded_plugins(), indent=2))
            (self.run_dir / "classes.json").write_text(json.dumps(self.classes, indent=2))
            if self.pretrained:
                (self.run_dir / "pretrained.json").write_text(json.dumps(self.pretrained, indent=2))

    def _resume_path(self) -> Path | None:
        """The checkpoint ``train.resume`` continues from, or None (see :func:`~detkit.engine.setup.resume_path`)."""
        return resume_path(self.cfg.train.resume, self.run_dir, self.is_main)

    def _close_log_file(self) -> None:
        if self._file_handler is not None:
            logging.getLogger("detkit").removeHandler(self._file_handler)
            self._file_handler.close()
            self._file_handler = None

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

    def _resume(self, path: Path) -> None:
        ckpt = load_checkpoint_file(path, map_location=self.device)
        check_compatible(ckpt, path, self.cfg.model.get("type"), self.classes)
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
