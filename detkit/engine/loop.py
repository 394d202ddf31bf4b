"""The running half of :class:`~detkit.engine.trainer.Trainer`: epochs of optimizer steps, evaluations, the time budget.

:class:`TrainingLoop` is the base class of ``Trainer``; its methods read the attributes ``Trainer``'s set-up gives
(model, optimizer, scheduler, scaler, sampler, data sets, counters; see ``Trainer``) and call its ``save_checkpoint``
and ``_close_log_file``. One optimizer step's forward, backward and reduced check are in :mod:`detkit.engine.step`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from detkit import plugins
from detkit.data.report import CountedLoader, CountingCollate, DataReport
from detkit.engine import distributed as du
from detkit.engine.evaluator import evaluate
from detkit.engine.sampling import SeededDataset, sample_seed
from detkit.engine.setup import seed_everything, with_key
from detkit.engine.step import SKIP_MESSAGES, DivergenceError, forward_backward, reduce_step
from detkit.errors import ConfigError

log = logging.getLogger("detkit.train")


class TrainingLoop:
    """``fit`` and everything it runs; see :class:`~detkit.engine.trainer.Trainer` for the attributes."""

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

            self.cfg = with_key(self.cfg, "train.eval_interval", eval_interval_for(self.planned_epochs))
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
        logged = forward_backward(self.model, self.criterion, window, self.device, self.amp_dtype, self.scaler,
                                  self.world_size)
        loss_ok, self.last_grad_norm, values = reduce_step(self.optimizer, self.scaler, float(tc.clip_max_norm),
                                                           logged, self.device)
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
            log.warning("step %d: %s, step skipped (%d in a row, limit train.max_bad_steps=%d)",
                        self.step + 1, SKIP_MESSAGES[self.last_skip_reason], self.bad_steps, int(tc.max_bad_steps))
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
