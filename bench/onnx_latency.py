#!/usr/bin/env python
"""ONNX Runtime latency of two exported files side by side, runs interleaved in one process (A B, B A, ...), so a
noisy machine slows both alike::

    python bench/onnx_latency.py before.onnx after.onnx --height 640 --width 640 --runs 20

Both files get the same input (batch 1, a fixed random image) and the same session options (``--threads`` intra-op
threads, CPU provider); the median, min and max of each are printed in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("::")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("files", nargs=2, help="two .onnx files written by `detkit export`")
    parser.add_argument("--height", type=int, default=640)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--runs", type=int, default=20, help="timed runs of each file (after 3 warm-up runs)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    args = parser.parse_args(argv)

    from detkit.export.session import ort_session

    sessions = [ort_session(path, threads=args.threads) for path in args.files]
    feed = {"images": np.random.default_rng(0).standard_normal((1, 3, args.height, args.width), dtype=np.float32),
            "orig_sizes": np.array([[args.height, args.width]], dtype=np.int64)}
    for session in sessions:
        for _ in range(3):
            session.run(None, feed)
    times: list[list[float]] = [[], []]
    for run in range(args.runs):
        for index in ((0, 1) if run % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            sessions[index].run(None, feed)
            times[index].append((time.perf_counter() - start) * 1e3)
    for path, values in zip(args.files, times, strict=True):
        print(f"{path}: median {statistics.median(values):.1f} ms  (min {min(values):.1f}, max {max(values):.1f}, "
              f"{len(values)} runs at {args.height}x{args.width})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
