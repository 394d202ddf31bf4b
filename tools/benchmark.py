#!/usr/bin/env python
"""Benchmark a model: parameters, FLOPs, latency, throughput, memory.

``python tools/benchmark.py CONFIG [--checkpoint CKPT] --height H --width W --batch B --threads T [--json OUT]``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
