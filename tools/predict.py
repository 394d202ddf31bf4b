#!/usr/bin/env python
"""Run a checkpoint on images, writing annotated images and JSON.

``python tools/predict.py --checkpoint CKPT IMAGE_OR_DIR ... --out DIR [--threshold 0.5]``; see ``--help``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
