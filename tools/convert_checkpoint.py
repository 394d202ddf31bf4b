#!/usr/bin/env python
"""Convert official DETR / LW-DETR checkpoints to detkit checkpoints and back; see ``--help``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
