"""``detkit predict``: a checkpoint (or an exported ONNX file) on images -> annotated images, JSON, COCO results."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from detkit.errors import ConfigError
from detkit.loading import WEIGHTS_CHOICES, default_cat_ids
from detkit.predict.api import Detector, find_images, read_image
from detkit.predict.draw import draw_predictions

__all__ = ["predict_main"]


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        stem = p.stem or "image"
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        stems.append(stem if n == 0 else f"{stem}_{n}")
    return stems


def predict_main(argv: list[str]) -> int:
    """``detkit predict --checkpoint CKPT IMAGE_OR_DIR ... --out DIR [--threshold 0.5]``."""
    parser = argparse.ArgumentParser(
        prog="detkit predict",
        description="Run a checkpoint on images: writes annotated images, one JSON per image and COCO results.")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    parser.add_argument("--checkpoint", required=True,
                        help="a detkit checkpoint (checkpoint_best.pth, ...), or an exported .onnx file with "
                             "--runtime onnxruntime")
    parser.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                        help="torch (a checkpoint) or onnxruntime (a file written by detkit export)")
    parser.add_argument("--tile", default="auto", metavar="SIZE",
                        help="predict in overlapping SIZE x SIZE tiles, merged across the seams; auto (default): "
                             "only images over 2x the model's input side, in tiles of that side; 0: never")
    parser.add_argument("--overlap", type=float, default=0.2, help="tile overlap, a fraction of SIZE (default 0.2)")
    parser.add_argument("--whole-image", action="store_true", help="with tiles, also predict the whole image")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--threshold", type=float, default=0.5, help="minimum score to keep (default 0.5)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--weights", choices=WEIGHTS_CHOICES, default="auto",
                        help="EMA or raw weights (auto: EMA when the checkpoint has them)")
    parser.add_argument("--recursive", action="store_true", help="also take images in sub-folders")
    parser.add_argument("--no-draw", action="store_true", help="only write JSON")
    parser.add_argument("--plugin-import", action="append", default=[], metavar="MODULE",
                        help="a local plugin module the checkpoint needs and you trust (repeatable)")
    parser.add_argument("--no-tf32", action="store_true", help="CUDA: full fp32 matmuls/convolutions (default TF32)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0 or math.isnan(args.threshold):
        raise ConfigError(f"--threshold must be within [0, 1], got {args.threshold}")
    from detkit.engine.precision import configure_tf32
    from detkit.tiling import check_tile_options, parse_tile, resolve_tile

    configure_tf32(not args.no_tf32)
    tile = parse_tile(args.tile)
    check_tile_options(64, args.overlap)
    paths = find_images(args.inputs, recursive=args.recursive)
    tiling = {"tile": tile, "overlap": args.overlap, "whole_image": args.whole_image}
    det: Detector
    if args.runtime == "onnxruntime":
        from detkit.export.runtime import OnnxDetector

        det = OnnxDetector(args.checkpoint, threshold=args.threshold, batch_size=args.batch_size, **tiling)
        cat_ids = list(det.cat_ids)
    else:
        if str(args.checkpoint).endswith(".onnx"):
            raise ConfigError(f"{args.checkpoint} is an ONNX file: add --runtime onnxruntime")
        det = Detector.from_checkpoint(args.checkpoint, device=args.device, threshold=args.threshold,
                                       batch_size=args.batch_size, weights=args.weights,
                                       plugin_imports=args.plugin_import, **tiling)
        assert det.loaded is not None
        cat_ids = default_cat_ids(det.loaded)
    out = Path(os.path.expanduser(args.out))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the folder: {e.strerror or e}") from e
    stems = _unique_stems(paths)
    coco_images, coco_results, total = [], [], 0
    for start in range(0, len(paths), det.batch_size):
        chunk = list(range(start, min(start + det.batch_size, len(paths))))
        arrays = [read_image(paths[i]) for i in chunk]
        preds = det.predict(arrays)
        for i, arr, pred in zip(chunk, arrays, preds):
            image_id = i + 1
            record = {"image": str(paths[i]), "image_id": image_id, **pred.as_dict()}
            (out / f"{stems[i]}.json").write_text(json.dumps(record, indent=1))
            if not args.no_draw:
                suffix = ".png" if paths[i].suffix.lower() == ".png" else ".jpg"
                draw_predictions(arr, pred).save(out / f"{stems[i]}{suffix}", quality=92)
            coco_images.append({"id": image_id, "file_name": str(paths[i]), "height": int(arr.shape[0]),
                                "width": int(arr.shape[1])})
            coco_results.extend(pred.to_coco(image_id, cat_ids))
            total += len(pred)
            size = resolve_tile(det.tile, arr.shape[:2], det.input_side)
            print(f"{paths[i]}: {len(pred)} detections" + (f" in {size} px tiles" if size else "") + (
                " (" + ", ".join(f"{n} {s:.2f}" for n, s in zip(pred.class_names[:5], pred.scores[:5].tolist()))
                + (", ..." if len(pred) > 5 else "") + ")" if len(pred) else ""))
    categories = [{"id": c, "name": n} for c, n in zip(cat_ids, det.classes) if n != "N/A"]
    (out / "coco_results.json").write_text(json.dumps(coco_results))
    (out / "coco_images.json").write_text(json.dumps({"images": coco_images, "categories": categories}))
    print(f"{len(paths)} images, {total} detections (score >= {args.threshold}) -> {out}")
    return 0
