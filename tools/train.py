#!/usr/bin/env python
"""Train a detector: ``python tools/train.py CONFIG [KEY=VALUE ...]`` (also under ``torchrun``); see ``--help``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
