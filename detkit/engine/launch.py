"""``detkit train CONFIG [KEY=VALUE ...]`` / ``python tools/train.py ...`` (also under ``torchrun``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from detkit.engine import distributed as du


def setup_logging(debug: bool = False) -> None:
    """Log lines to stdout on rank 0 (INFO, or DEBUG with ``--debug``); other ranks only warn."""
    logger = logging.getLogger("detkit")
    if any(getattr(h, "_detkit_console", False) for h in logger.handlers):
        return
    rank = int(__import__("os").environ.get("RANK", "0"))
    handler = logging.StreamHandler(sys.stdout)
    handler._detkit_console = True  # type: ignore[attr-defined]
    prefix = f"[rank {rank}] " if du.env_world_size() > 1 else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else (logging.INFO if rank == 0 else logging.WARNING))
    logger.propagate = False


def train_main(argv: list[str]) -> int:
    """Parse ``CONFIG [KEY=VALUE ...] [--debug]``, train, print the final metrics; returns the exit code.

    User errors are raised as :class:`detkit.errors.DetkitError` (the ``detkit`` CLI prints them).
    """
    parser = argparse.ArgumentParser(
        prog="detkit train",
        description="Train a detector. Multi-GPU / multi-node: torchrun --nproc_per_node=N tools/train.py CONFIG ...",
    )
    parser.add_argument("config", help="YAML config, e.g. configs/lwdetr_vit.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=50 data.root=~/data/coco")
    parser.add_argument("--debug", action="store_true", help="debug logging (and tracebacks in the detkit CLI)")
    args = parser.parse_args(argv)
    setup_logging(args.debug)

    from detkit.config import compose
    from detkit.engine.trainer import train

    cfg = compose(args.config, args.overrides)
    t0 = time.monotonic()
    try:
        metrics = train(cfg)
    finally:
        du.teardown()
    if du.env_world_size() <= 1 or int(__import__("os").environ.get("RANK", "0")) == 0:
        wall = time.monotonic() - t0
        print(f"done in {wall / 60:.1f} min; output in {cfg.runtime.output_dir}")
        if metrics:
            print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    return 0
