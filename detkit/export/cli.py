"""``detkit export --checkpoint CKPT --out model.onnx``: a checkpoint to ONNX (:mod:`detkit.export.onnx`), checked."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from detkit.errors import ConfigError
from detkit.export.onnx import ExportError, export_onnx, preprocessing_metadata, size_divisibility, verify_onnx


def export_main(argv: list[str]) -> int:
    """``detkit export --checkpoint CKPT --out model.onnx [--height H --width W]``."""
    parser = argparse.ArgumentParser(
        prog="detkit export",
        description="Export a checkpoint to ONNX (post-processing inside, class names and preprocessing in the "
                    "metadata) and check it with onnxruntime against PyTorch.")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--height", type=int, default=0, help="example height (default: the evaluation size)")
    parser.add_argument("--width", type=int, default=0, help="example width (default: the evaluation size)")
    parser.add_argument("--batch", type=int, default=1, help="example batch size")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--static", action="store_true", help="fix batch and image size to the example's")
    parser.add_argument("--weights", choices=("auto", "ema", "model"), default="auto")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    parser.add_argument("--plugin-import", action="append", default=[], metavar="MODULE",
                        help="a local plugin module the checkpoint needs and you trust (repeatable)")
    args = parser.parse_args(argv)

    import detkit
    from detkit.loading import load_for_inference

    loaded = load_for_inference(args.checkpoint, device="cpu", weights=args.weights,
                                plugin_imports=args.plugin_import)
    model = loaded.model
    div = size_divisibility(model)
    height, width = args.height, args.width
    if not (height and width):
        h0, w0 = default_size(loaded.val_transforms, div)
        height, width = height or h0, width or w0
    for name, v in (("--height", height), ("--width", width), ("--batch", args.batch)):
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    if height % div or width % div:
        raise ConfigError(f"this {type(model).__name__} needs image sides that are multiples of {div}; "
                          f"got --height {height} --width {width}")
    post = type(model.postprocessor).__name__
    meta = {
        "classes": loaded.classes,
        "num_classes": int(getattr(model, "num_classes", len(loaded.classes))),
        "model_type": str((loaded.config.get("model") or {}).get("type")),
        "score": "softmax" if "Softmax" in post else ("sigmoid" if "Sigmoid" in post else post),
        "preprocessing": preprocessing_metadata(loaded.val_transforms, div),
        "inputs": "images float32 (B,3,H,W) normalised; orig_sizes int64 (B,2) as (h,w)",
        "outputs": "scores float32 (B,K); labels int64 (B,K); boxes float32 (B,K,4) xyxy in original pixels",
        "source_checkpoint": Path(args.checkpoint).name,
        "weights": loaded.weights,
        "detkit_version": detkit.__version__,
    }
    out = Path(os.path.expanduser(args.out))
    step = max(div, 32)
    other = (height + step, width + 2 * step)  # the second resolution of the check
    mode = "none" if args.static else "all"
    t0 = time.perf_counter()
    export_onnx(model, out, height, width, batch=args.batch, opset=args.opset, dynamic=mode,
                metadata={**meta, "dynamic": mode})
    if args.no_check:
        _print_written(out, args, height, width, mode, time.perf_counter() - t0)
        return 0
    shapes = [(args.batch, height, width)] if mode == "none" else [(b, h, w) for h, w in ((height, width), other)
                                                                     for b in (1, 2)]
    try:
        records = verify_onnx(out, model, shapes, tolerance=args.tolerance)
    except ExportError as e:
        if mode != "none":
            e.add_note("a model that fixes the image size in its graph can be exported with --static")
        raise
    _print_written(out, args, height, width, mode, time.perf_counter() - t0)
    print("onnxruntime vs PyTorch (max abs difference; boxes relative to the image size):")
    for r in records:
        line = f"  batch {r['batch']}  {r['height']}x{r['width']}:  scores {r['scores']:.2e}  boxes {r['boxes']:.2e}"
        if r["near_tie"]:
            d = r["float64"]
            line += (f"  near-tie: the top-k choices differ within {r['tie_gap']:.1e}; with onnxruntime's choices "
                     f"float64 PyTorch gives scores {d['scores']:.2e}  boxes {d['boxes']:.2e}")
        print(line)
    ties = sum(r["near_tie"] for r in records)
    worst = max(max(r["float64"]["scores"], r["float64"]["boxes"]) if r["near_tie"] else max(r["scores"], r["boxes"])
                for r in records)
    print(f"check passed: max abs difference {worst:.2e} <= {args.tolerance}; near-ties: {ties} of {len(records)} "
          "inputs")
    return 0


def _print_written(out: Path, args: argparse.Namespace, height: int, width: int, mode: str, seconds: float) -> None:
    dyn = {"all": "dynamic batch and image size", "batch": "dynamic batch, fixed image size",
           "none": "static shape"}[mode]
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, opset {args.opset}, {seconds:.1f} s); "
          f"input {args.batch}x3x{height}x{width} ({dyn})")


def default_size(val_transforms: Mapping[str, Any] | None, divisibility: int) -> tuple[int, int]:
    """A sensible example size: the evaluation transform's square size (LW-DETR), its shorter side (DETR,
    as a square), else 640; rounded up to ``divisibility``."""
    side = 640
    node = dict(val_transforms or {})
    if node.get("type") == "lwdetr_val":
        side = int(node.get("size", 640))
    elif node.get("type") == "detr_val":
        side = int(node.get("size", 800))
    elif node.get("type") in ("square_resize", "random_resize") and node.get("sizes"):
        side = int(node["sizes"][0])
    side = -(-side // divisibility) * divisibility
    return side, side
