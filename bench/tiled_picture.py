#!/usr/bin/env python
"""Tiled prediction, shown and scored: the `make train` model on images four times its input side.

::

    make train   # runs/lwdetr_vit/checkpoint_best.pth: LW-DETR-tiny, 128 px input, built-in shapes
    python bench/tiled_picture.py --checkpoint runs/lwdetr_vit/checkpoint_best.pth --picture docs/tiled_prediction.png

The large images are mosaics of ``--grid`` x ``--grid`` validation images of the data set the model was trained on
(the ``data.synthetic`` options saved in its checkpoint, held-out seeds), written as a COCO folder under ``--out``.
``detkit eval`` scores the source images one by one (the reference), then the mosaics twice: the whole image resized
to the model's input (objects shrink ``--grid`` times), and in tiles of the input's side (``--tile``, default the model's input side). The picture is the tiled prediction of the
first mosaic, tile outlines in white.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_mosaics(checkpoint: Path, root: Path, sources: Path, grid: int, count: int) -> tuple[list[str], int]:
    """Write ``count`` mosaics of ``grid`` x ``grid`` held-out images as a COCO ``val`` split under ``root``, and the
    same images one by one under ``sources``.

    Returns the class names and the side of one source image."""
    from PIL import Image

    from detkit.data.datasets.synthetic import synthetic
    from detkit.weights.io import load_checkpoint_file

    options = dict(load_checkpoint_file(checkpoint)["config"]["data"]["synthetic"])
    classes = list(options.get("shapes", ["circle", "square", "triangle"]))
    options.update(num_val=grid * grid * count, val_seed=10_000 + int(options.get("seed", 0)))
    dataset = synthetic("val", **options)
    split, source_split = root / "val", sources / "val"
    split.mkdir(parents=True, exist_ok=True)
    source_split.mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": categories}
    source_coco: dict[str, Any] = {"images": [], "annotations": [], "categories": categories}
    side = 0
    for mosaic in range(count):
        rows = []
        for row in range(grid):
            cells = []
            for column in range(grid):
                index = (mosaic * grid + row) * grid + column
                image, boxes, labels = dataset.read(index)
                side = image.shape[0]
                cells.append(image)
                Image.fromarray(image).save(source_split / f"{index}.png")
                source_coco["images"].append({"id": index + 1, "file_name": f"{index}.png",
                                              "height": image.shape[0], "width": image.shape[1]})
                for (x1, y1, x2, y2), label in zip(np.asarray(boxes).tolist(), np.asarray(labels).tolist()):
                    source_coco["annotations"].append({"id": len(source_coco["annotations"]) + 1,
                                                       "image_id": index + 1, "category_id": int(label) + 1,
                                                       "bbox": [x1, y1, x2 - x1, y2 - y1],
                                                       "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
                    x1, x2 = x1 + column * image.shape[1], x2 + column * image.shape[1]
                    y1, y2 = y1 + row * image.shape[0], y2 + row * image.shape[0]
                    coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": mosaic + 1,
                                                "category_id": int(label) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
            rows.append(np.concatenate(cells, axis=1))
        picture = np.concatenate(rows, axis=0)
        Image.fromarray(picture).save(split / f"mosaic_{mosaic}.png")
        coco["images"].append({"id": mosaic + 1, "file_name": f"mosaic_{mosaic}.png", "height": picture.shape[0],
                               "width": picture.shape[1]})
    (split / "_annotations.coco.json").write_text(json.dumps(coco))
    (source_split / "_annotations.coco.json").write_text(json.dumps(source_coco))
    return classes, side


def evaluate(checkpoint: Path, root: Path, tile: int, out: Path) -> dict[str, float]:
    """``detkit eval`` of the mosaics, whole (``tile=0``) or tiled; returns the metrics it wrote."""
    from detkit.cli import main as detkit_main

    config = REPO / "configs" / "lwdetr_vit.yaml"
    code = detkit_main(["eval", str(config), f"data.root={root}", "data.format=coco", "--checkpoint", str(checkpoint),
                        "--tile", str(tile), "--out", str(out), "--batch-size", "4"])
    if code != 0:
        raise SystemExit(f"detkit eval failed with exit code {code}")
    return json.loads(out.read_text())["metrics"]


def draw(checkpoint: Path, image_path: Path, tile: int, picture: Path, threshold: float) -> int:
    """Draw the tiled prediction of one mosaic with the tile outlines; returns the number of detections drawn."""
    from PIL import ImageDraw

    from detkit.predict import Detector, draw_predictions, read_image
    from detkit.tiling import tile_windows

    detector = Detector.from_checkpoint(checkpoint, threshold=threshold, tile=tile)
    image = read_image(image_path)
    prediction = detector.predict(image)
    canvas = draw_predictions(image, prediction)
    outline = ImageDraw.Draw(canvas)
    for x0, y0, x1, y1 in tile_windows(image.shape[0], image.shape[1], tile, detector.overlap):
        outline.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 255, 255), width=1)
    picture.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(picture)
    return len(prediction)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/lwdetr_vit/checkpoint_best.pth")
    parser.add_argument("--out", default="runs/bench_tiled")
    parser.add_argument("--grid", type=int, default=4, help="source images per mosaic side")
    parser.add_argument("--count", type=int, default=8, help="number of mosaics")
    parser.add_argument("--tile", type=int, default=0, help="tile side (default: the model's input side)")
    parser.add_argument("--threshold", type=float, default=0.5, help="score threshold of the picture")
    parser.add_argument("--picture", default=None, metavar="PNG", help="draw the first mosaic's tiled prediction here")
    args = parser.parse_args(argv)
    checkpoint, out = Path(args.checkpoint).resolve(), Path(args.out).resolve()
    if not checkpoint.is_file():
        raise SystemExit(f"no checkpoint at {checkpoint}: run `make train` first, or pass --checkpoint")
    data = out / "data"
    classes, side = make_mosaics(checkpoint, data, out / "sources", args.grid, args.count)
    tile = args.tile or side
    alone = evaluate(checkpoint, out / "sources", 0, out / "eval_sources.json")
    whole = evaluate(checkpoint, data, 0, out / "eval_whole.json")
    tiled = evaluate(checkpoint, data, tile, out / "eval_tiled.json")
    mosaic_side = side * args.grid
    print(f"\n{args.count} mosaics of {mosaic_side}x{mosaic_side} px ({args.grid}x{args.grid} held-out {side} px images)")
    print("| prediction | AP50 | AP |\n|---|---|---|")
    print(f"| the {side} px source images, one by one (reference) | {alone['AP50']:.3f} | {alone['AP']:.3f} |")
    print(f"| whole image, resized to the model's input | {whole['AP50']:.3f} | {whole['AP']:.3f} |")
    print(f"| tiles of {tile} px | {tiled['AP50']:.3f} | {tiled['AP']:.3f} |")
    if args.picture:
        drawn = draw(checkpoint, data / "val" / "mosaic_0.png", tile, Path(args.picture), args.threshold)
        print(f"{drawn} detections (score >= {args.threshold}) drawn -> {args.picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
