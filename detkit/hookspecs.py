"""Engine events a plugin can implement with ``@detkit.plugins.hookimpl``.

Each hook is called on rank 0 and on every other rank alike; use ``trainer.is_main`` to act once. Hooks must not
change the model or optimizer in ways the checkpoint cannot restore. A plugin module that defines any of these
functions (decorated with ``hookimpl``) is registered on the plugin manager when it is imported; callbacks chosen in
the config (EMA, checkpointing, logging) are registered on the same manager.

Example (in a plugin module)::

    from detkit.plugins import hookimpl

    @hookimpl
    def detkit_after_epoch(trainer, epoch, metrics):
        print(f"epoch {epoch}: {metrics}")
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("detkit")


@hookspec
def detkit_train_start(trainer: Any) -> None:
    """Training is about to run its first step (after any resume).

    :param trainer: the :class:`detkit.engine.trainer.Trainer`; ``trainer.model``, ``trainer.cfg``,
        ``trainer.run_dir``, ``trainer.epoch`` and ``trainer.step`` are ready.
    """


@hookspec
def detkit_after_step(trainer: Any, step: int, losses: dict[str, float]) -> None:
    """An optimizer step finished (or was skipped because the loss was not finite).

    :param step: global optimizer step count after this step, starting at 1.
    :param losses: the weighted loss terms and ``loss`` (their sum), as Python floats, averaged over ranks.
    """


@hookspec
def detkit_after_epoch(trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
    """An epoch of training finished.

    :param epoch: the epoch that finished, starting at 0.
    :param metrics: mean training losses of the epoch and the learning rate.
    """


@hookspec
def detkit_after_eval(trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
    """An evaluation finished.

    :param metrics: COCO metrics keyed ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``, ``AR1``, ... (0-1 scale).
    """


@hookspec
def detkit_train_end(trainer: Any, metrics: dict[str, float]) -> None:
    """Training finished normally (not called when it stopped with an error).

    :param metrics: the final evaluation metrics (empty when no evaluation ran).
    """
