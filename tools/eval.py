#!/usr/bin/env python
"""Evaluate a checkpoint: COCO metrics, per-class table, confusion matrix, PR curves (also under torchrun).

``python tools/eval.py CONFIG --checkpoint CKPT [KEY=VALUE ...] [--out metrics.json]``; see ``--help``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
