#!/usr/bin/env python
"""Small-data benchmark: the own-data recipe against the official LW-DETR-tiny training recipe, same CPU time.

::

    python bench/small_data.py --minutes 10 --seeds 0 1 --out runs/bench_small

The data (made here, written once as a COCO folder under ``--out``): the built-in shapes generator at 320 px with
textured, cluttered backgrounds, 12-40 objects per image of 10-100 px, three labelled shapes and two more drawn but
not labelled (distractors the detector must learn to ignore); ``--num-train`` training images (default 40), a
validation split the runs evaluate on while training, and a held-out test split (default 40 images) that scores them.

Per seed, the two recipes train at the same time, one thread each, for ``--minutes`` of wall-clock time
(``train.max_minutes``, evaluations included), so both see the same contention on a shared machine:

- own-data: ``tools/train.py configs/lwdetr_own_data.yaml data.root=DATA`` (the recipe derived from the data);
- official: ``tools/train.py configs/lwdetr_tiny_coco.yaml data.root=DATA`` with the data set's classes
  (``model.num_classes=null data.label_map=contiguous``), everything else as the official LW-DETR-tiny COCO recipe:
  batch 4, AdamW lr 1e-4 (ViT 1.5e-4, layer decay 0.8), constant lr, EMA 0.9997, 13 query groups, 100 queries,
  448-896 px multi-scale training, 640 px evaluation; it evaluates only at the end (``train.eval_interval=0``, so
  no budget goes to evaluations the official code would run every epoch).

Then ``checkpoint_last.pth`` of each run is scored on the test split (``detkit eval``; EMA weights when there are).
Results go to ``OUT/results.json`` and a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHAPES = ["circle", "square", "triangle", "star", "cross"]
LABELLED = 3  # the first three shapes are labelled; stars and crosses are unlabelled distractors

RECIPES: dict[str, tuple[str, list[str]]] = {
    "own-data": ("configs/lwdetr_own_data.yaml", []),
    "official": ("configs/lwdetr_tiny_coco.yaml", ["data.format=coco", "data.label_map=contiguous",
                                                   "model.num_classes=null", "train.eval_interval=0"]),
}


def make_data(root: Path, num_train: int, num_val: int, num_test: int, size: int = 320, seed: int = 0) -> Path:
    """Write the benchmark data set as a COCO folder (once; an existing complete folder is reused)."""
    import cv2
    import numpy as np

    from detkit.data.datasets.synthetic import synthetic

    marker = root / "done.json"
    spec = {"num_train": num_train, "num_val": num_val, "num_test": num_test, "size": size, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    options = {"image_size": size, "shapes": SHAPES, "min_objects": 12, "max_objects": 40,
               "size_range": [10 / size, 100 / size], "clutter": 1.5, "seed": seed}
    splits = {"train": synthetic("train", num_train=num_train, **options),
              "val": synthetic("val", num_val=num_val, val_seed=seed + 1000, **options),
              "test": synthetic("val", num_val=num_test, val_seed=seed + 2000, **options)}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(SHAPES[:LABELLED])]
    for split, ds in splits.items():
        folder = root / f"{split}2017"
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(len(ds)):
            image, boxes, labels = ds.read(index)
            info = ds.image_info(index)
            cv2.imwrite(str(folder / info["file_name"]), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            images.append({"id": info["id"], "file_name": info["file_name"], "width": info["width"],
                           "height": info["height"]})
            for box, label in zip(np.asarray(boxes).tolist(), np.asarray(labels).tolist()):
                if label < LABELLED:
                    w, h = box[2] - box[0], box[3] - box[1]
                    annotations.append({"id": len(annotations) + 1, "image_id": info["id"], "category_id": label + 1,
                                        "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
        (root / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    marker.write_text(json.dumps(spec))
    return root


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def train_command(recipe: str, data: Path, run_dir: Path, minutes: float, seed: int) -> list[str]:
    config, extra = RECIPES[recipe]
    return [sys.executable, "tools/train.py", config, f"data.root={data}", *extra, f"train.max_minutes={minutes}",
            f"train.seed={seed}", "runtime.threads=1", "data.num_workers=0", "runtime.device=cpu",
            "runtime.progress=log", "runtime.tensorboard=false", f"runtime.output_dir={run_dir}"]


def eval_command(recipe: str, data: Path, run_dir: Path) -> list[str]:
    config, extra = RECIPES[recipe]
    return [sys.executable, "tools/eval.py", config, f"data.root={data}", *extra, "data.val_split=test",
            "data.num_workers=0", "runtime.threads=2", "--checkpoint", str(run_dir / "checkpoint_last.pth"),
            "--out", str(run_dir / "test_metrics.json")]


def run_seed(data: Path, out: Path, minutes: float, seed: int) -> dict[str, Any]:
    """Both recipes of one seed side by side, then their test scores."""
    procs = {}
    for recipe in RECIPES:
        run_dir = out / f"{recipe}_seed{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        log = open(run_dir / "stdout.log", "w")  # noqa: SIM115 - closed below
        procs[recipe] = (subprocess.Popen(train_command(recipe, data, run_dir, minutes, seed), cwd=REPO, env=_env(),
                                          stdout=log, stderr=subprocess.STDOUT), log, run_dir, time.monotonic())
    results: dict[str, Any] = {}
    for recipe, (proc, log, run_dir, t0) in procs.items():
        code = proc.wait()
        log.close()
        wall = time.monotonic() - t0
        if code != 0:
            raise RuntimeError(f"{recipe} seed {seed} failed (exit {code}); see {run_dir / 'stdout.log'}")
        results[recipe] = {"train_wall_s": round(wall, 1), "run_dir": str(run_dir)}
    for recipe, entry in results.items():
        run_dir = Path(entry["run_dir"])
        subprocess.run(eval_command(recipe, data, run_dir), cwd=REPO, env=_env(), check=True,
                       stdout=subprocess.DEVNULL)
        metrics = json.loads((run_dir / "test_metrics.json").read_text())["metrics"]
        from detkit.weights.io import load_checkpoint_file

        ckpt = load_checkpoint_file(run_dir / "checkpoint_last.pth")
        cfg = ckpt["config"]
        entry.update({"AP50": round(metrics["AP50"], 4), "AP": round(metrics["AP"], 4), "steps": int(ckpt["step"]),
                      "epochs_done": int(ckpt["epoch"]), "input_size": cfg["data"]["val_transforms"].get("size", 640),
                      "num_queries": cfg["model"]["num_queries"], "batch_size": cfg["train"]["batch_size"]})
        print(f"seed {seed} {recipe}: AP50 {entry['AP50']:.4f} AP {entry['AP']:.4f} after {entry['steps']} steps "
              f"({entry['train_wall_s'] / 60:.1f} min)", flush=True)
    return results


def tiled_picture(checkpoint: Path, out_png: Path, side: int = 960, seed: int = 5, threshold: float = 0.2) -> str:
    """Draw a tiled prediction of the own-data model on one ``side`` px image of the benchmark's kind (objects of
    10-100 px, so the model's input side is a third of the image): the tiles' outlines thin, the merged boxes on top.
    Returns a one-line summary."""
    import numpy as np
    from PIL import ImageDraw

    from detkit.data.datasets.synthetic import synthetic
    from detkit.predict import Detector, draw_predictions
    from detkit.tiling import resolve_tile, tile_windows

    ds = synthetic("val", num_val=1, val_seed=seed, image_size=side, shapes=SHAPES, min_objects=60,
                   max_objects=140, size_range=[10 / side, 100 / side], clutter=1.5)
    image, boxes, labels = ds.read(0)
    det = Detector.from_checkpoint(checkpoint, threshold=threshold, tile="auto")
    tile = resolve_tile("auto", image.shape[:2], det.input_side)
    pred = det.predict(image)
    canvas = draw_predictions(image, pred)
    draw = ImageDraw.Draw(canvas)
    for x0, y0, x1, y1 in tile_windows(side, side, int(tile or side), det.overlap):
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 255, 255), width=1)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png)
    labelled = int((np.asarray(labels) < LABELLED).sum())
    return (f"{side}x{side} image, {labelled} labelled objects; model input {det.input_side} px -> tiles of {tile} "
            f"px, overlap {det.overlap}: {len(pred)} detections (score >= {threshold}) -> {out_png}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall-clock time per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default="runs/bench_small")
    parser.add_argument("--num-train", type=int, default=40)
    parser.add_argument("--num-val", type=int, default=10)
    parser.add_argument("--num-test", type=int, default=40)
    parser.add_argument("--picture", default=None, metavar="PNG",
                        help="also draw a tiled prediction of the first seed's own-data model here")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    data = make_data(out / "data", args.num_train, args.num_val, args.num_test)
    per_seed = {seed: run_seed(data, out, args.minutes, seed) for seed in args.seeds}
    summary: dict[str, Any] = {"minutes": args.minutes, "seeds": args.seeds, "num_train": args.num_train,
                               "num_test": args.num_test, "per_seed": per_seed, "mean": {}}
    print(f"\n| recipe | mAP50 (mean of {len(args.seeds)} seeds) | per seed | steps | input | queries | batch |")
    print("|---|---|---|---|---|---|---|")
    for recipe in RECIPES:
        runs = [per_seed[s][recipe] for s in args.seeds]
        mean = sum(r["AP50"] for r in runs) / len(runs)
        summary["mean"][recipe] = round(mean, 4)
        scores = " / ".join(f"{r['AP50']:.3f}" for r in runs)
        steps = " / ".join(str(r["steps"]) for r in runs)
        print(f"| {recipe} | {mean:.3f} | {scores} | {steps} | {runs[0]['input_size']} | {runs[0]['num_queries']} | "
              f"{runs[0]['batch_size']} |")
    if args.picture:
        line = tiled_picture(out / f"own-data_seed{args.seeds[0]}" / "checkpoint_last.pth", Path(args.picture))
        summary["picture"] = line
        print(line)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"\n-> {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
