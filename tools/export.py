#!/usr/bin/env python
"""Export a checkpoint to ONNX and check it with onnxruntime against PyTorch.

``python tools/export.py --checkpoint CKPT --out model.onnx``; see ``--help``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
