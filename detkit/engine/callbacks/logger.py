"""Progress, metrics files and curves: a tqdm bar on a terminal (plain log lines otherwise), ``metrics.jsonl``,
TensorBoard event files and ``curves.png`` at the end. Everything happens on rank 0 only."""

from __future__ import annotations

import errno
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from detkit.errors import OutputError
from detkit.plugins import hookimpl
from detkit.registry import CALLBACKS

log = logging.getLogger("detkit.train")


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def write_error(path: Path, e: OSError, trainer: Any) -> OutputError:
    """The :class:`OutputError` for a failed write of ``path``: the file, the cause (a full disk said so), where
    training stopped and the last good checkpoint, which the failed write left as it was."""
    cause = e.strerror or str(e)
    full = e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    if full:
        cause += " (disk full)"
    last = Path(trainer.run_dir) / "checkpoint_last.pth"
    keep = (f"; the last good checkpoint {last} is intact: {'free some space' if full else 'fix that'} and continue "
            "with train.resume=auto" if last.is_file() else "")
    return OutputError(f"cannot write metrics {path}: {cause}; training stopped at epoch {trainer.current_epoch}, "
                       f"step {trainer.step}{keep}")


@CALLBACKS.register("logger")
class LoggerCallback:
    """Training progress and metric records.

    :param progress: ``auto`` (tqdm bar when stderr is a terminal), ``bar`` or ``log``.
    :param log_interval: optimizer steps between log lines (``log`` mode) and between ``metrics.jsonl`` step records.
    :param tensorboard: also write TensorBoard event files to the run directory.
    :param plot: write ``curves.png`` (training loss and validation mAP) when training ends.
    """

    name = "logger"

    def __init__(self, progress: str = "auto", log_interval: int = 10, tensorboard: bool = True,
                 plot: bool = True) -> None:
        if progress not in ("auto", "bar", "log"):
            raise ValueError(f"progress must be auto, bar or log, got {progress!r}")
        self.use_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
        self.log_interval = max(int(log_interval), 1)
        self.tensorboard = tensorboard
        self.plot = plot
        self._bar: Any = None
        self._writer: Any = None
        self._file: Any = None
        self._path = Path("metrics.jsonl")
        self._running: dict[str, float] = {}
        self._count = 0
        self._t0 = time.monotonic()
        self._start_step = 0

    # -- outputs ----------------------------------------------------------------------------------------------
    def _record(self, trainer: Any, kind: str, values: dict[str, Any]) -> None:
        row = {"type": kind, "epoch": trainer.current_epoch, "step": trainer.step, "time": round(time.time(), 3),
               **values}
        if self._file is not None:
            try:
                self._file.write(json.dumps(row, allow_nan=True) + "\n")
                self._file.flush()
            except OSError as e:
                self._close_file()
                raise write_error(self._path, e, trainer) from e
        if self._writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._writer.add_scalar(f"{kind}/{k}", v, trainer.step)

    @hookimpl
    def detkit_train_start(self, trainer: Any) -> None:
        if not trainer.is_main:
            return
        run_dir = Path(trainer.run_dir)
        path = run_dir / "metrics.jsonl"
        self._path = path
        try:
            cut = path.is_file() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
            self._file = open(path, "a", encoding="utf-8")
            if cut:  # a run killed mid-line: end that line, so the next record is not glued to it
                self._file.write("\n")
                self._file.flush()
        except OSError as e:
            self._close_file()
            raise write_error(path, e, trainer) from e
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            except ImportError as e:  # tensorboard is a dependency, but a broken install must not stop training
                log.warning("TensorBoard logging is off: %s", e)
        self._t0 = time.monotonic()
        self._start_step = trainer.step
        log.info("training %s for %d epochs (%d steps/epoch) from epoch %d step %d; run dir %s",
                 trainer.cfg.model.get("type", "?"), trainer.cfg.train.epochs, trainer.steps_per_epoch,
                 trainer.epoch, trainer.step, run_dir)

    @hookimpl
    def detkit_after_step(self, trainer: Any, step: int, losses: dict[str, float]) -> None:
        if not trainer.is_main:
            return
        for k, v in losses.items():
            if math.isfinite(v):
                self._running[k] = self._running.get(k, 0.0) + v
        self._count += 1
        lr = trainer.current_lr()
        done = step - self._start_step
        elapsed = time.monotonic() - self._t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (trainer.total_steps - step) / rate if rate > 0 else float("inf")
        if not trainer.last_step_ok:
            self._record(trainer, "bad_step", {**losses, "lr": lr, "grad_norm": trainer.last_grad_norm,
                                               "reason": getattr(trainer, "last_skip_reason", ""),
                                               "skipped_steps": getattr(trainer, "skipped_steps", 0)})
        if self.use_bar:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=trainer.steps_per_epoch, initial=max(trainer.step_in_epoch - 1, 0),
                                 desc=f"epoch {trainer.current_epoch}", dynamic_ncols=True, leave=True)
            self._bar.update(1)
            self._bar.set_postfix_str(f"loss {losses.get('loss', float('nan')):.4f} lr {lr:.2e} eta {_fmt_time(eta)}",
                                      refresh=False)
        if step % self.log_interval == 0 or not trainer.last_step_ok:
            mean = {k: v / self._count for k, v in self._running.items()}
            self._record(trainer, "train", {**mean, "lr": lr, "grad_norm": trainer.last_grad_norm,
                                            "steps_per_s": rate})
            if not self.use_bar:
                terms = " ".join(f"{k} {_fmt(v)}" for k, v in mean.items() if k != "loss")
                log.info("epoch %d [%d/%d] step %d loss %s (%s) lr %.2e %.2f it/s eta %s",
                         trainer.current_epoch, trainer.step_in_epoch, trainer.steps_per_epoch, step,
                         _fmt(mean.get("loss", float("nan"))), terms, lr, rate, _fmt_time(eta))
            self._running, self._count = {}, 0

    @hookimpl
    def detkit_after_eval(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        if not trainer.is_main:
            return
        self._close_bar()
        self._record(trainer, "eval", dict(metrics))
        log.info("eval epoch %d: AP %.4f AP50 %.4f AP75 %.4f AR100 %.4f", epoch, metrics.get("AP", 0.0),
                 metrics.get("AP50", 0.0), metrics.get("AP75", 0.0), metrics.get("AR100", 0.0))

    @hookimpl
    def detkit_after_epoch(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        if not trainer.is_main:
            return
        self._close_bar()
        self._record(trainer, "epoch", {"finished_epoch": epoch, **metrics})
        shown = {k: v for k, v in metrics.items() if k in ("train_loss", "lr", "val_AP", "val_AP50")}
        log.info("epoch %d done: %s", epoch, " ".join(f"{k} {_fmt(v)}" for k, v in shown.items()))

    @hookimpl
    def detkit_train_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        if not trainer.is_main:
            return
        self.close()
        if self.plot:
            try:
                path = plot_curves(Path(trainer.run_dir) / "metrics.jsonl", Path(trainer.run_dir) / "curves.png")
                log.info("curves written to %s", path)
            except Exception as e:  # a plotting problem must never fail a finished training run
                log.warning("could not write curves.png: %s", e)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        """Close the bar and files (also called by the trainer when training stops with an error)."""
        self._close_bar()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._close_file()

    def _close_file(self) -> None:
        """Close ``metrics.jsonl``; records that cannot be flushed any more (full disk) are given up, not raised
        again: the write that failed already raised the error that stops training."""
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as e:
                log.debug("closing %s: %s", self._path, e)


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash
                continue
    return rows


def plot_curves(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Plot training loss against step and validation AP / AP50 against epoch from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("type") == "train" and isinstance(r.get("loss"), (int, float))]
    evals = [r for r in rows if r.get("type") == "eval"]
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3)
    if evals:
        x = [r["epoch"] + 1 for r in evals]
        for key in ("AP", "AP50"):
            ax_map.plot(x, [r.get(key, 0.0) for r in evals], marker="o", label=key)
        ax_map.legend()
    ax_map.set_xlabel("epoch")
    ax_map.set_ylabel("COCO metric")
    ax_map.set_title("validation")
    ax_map.grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path
