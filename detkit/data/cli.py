"""``detkit data check ROOT`` and ``detkit data synth --out DIR``.

``check`` loads every split, inspects every image (header only, or fully decoded with ``--decode``) and prints each
problem kind with counts and example files, the class histogram and the box-size histogram; exit status 0 when the
data set is usable (train and val load, each has a readable image, train has boxes), 1 otherwise.

``synth`` writes the built-in synthetic data set in the COCO 2017 layout, for inspection or for use as a COCO set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from detkit.errors import DataError, DetkitError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detkit data", description="Inspect or generate data sets.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="report every data problem, class and box-size histograms")
    check.add_argument("root", help="data set folder")
    check.add_argument("--format", default="auto", help="auto (default) | coco | yolo | voc | <plugin format>")
    check.add_argument("--splits", nargs="+", default=["train", "val"], help="splits to check (default: train val)")
    check.add_argument("--label-map", default="contiguous", choices=["contiguous", "coco_official"])
    check.add_argument("--classes", nargs="+", default=None, help="class names (VOC)")
    check.add_argument("--decode", action="store_true", help="decode every image fully (slower, finds truncation)")
    synth = sub.add_parser("synth", help="write the synthetic data set in the COCO 2017 layout")
    synth.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    synth.add_argument("--num-train", type=int, default=200)
    synth.add_argument("--num-val", type=int, default=50)
    synth.add_argument("--size", type=int, default=320, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--shapes", nargs="+", default=None, help="class shapes (default: circle square triangle)")
    return parser


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    """Run ``detkit data ...`` with ``argv`` (without the leading ``data``); returns the exit status."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    out = out or sys.stdout
    if args.command == "check":
        return check(args.root, args.format, args.splits, args.label_map, args.classes, args.decode, out)
    return synth(Path(args.out), args.num_train, args.num_val, args.size, args.seed, args.shapes, out)


def check(root: str, fmt: str = "auto", splits: list[str] | tuple[str, ...] = ("train", "val"),
          label_map: str = "contiguous", classes: list[str] | None = None, decode: bool = False,
          out: TextIO | None = None) -> int:
    from detkit.data.build import build_dataset, detect_format

    out = out or sys.stdout
    root_path = Path(root).expanduser()
    if fmt == "auto":
        fmt = detect_format(root_path)
    cfg = {"format": fmt, "root": str(root_path), "label_map": label_map, "classes": classes}
    print(f"data set {root_path} (format: {fmt})", file=out)
    problems: list[str] = []
    reference = None
    for split in splits:
        print(f"\n== split {split!r}", file=out)
        try:
            ds = build_dataset(cfg, split, None, reference=reference)
        except DetkitError as e:
            print(f"  cannot load: {e}", file=out)
            problems.append(f"split {split!r} cannot be loaded")
            continue
        reference = reference or ds
        if hasattr(ds, "check_image"):
            readable = sum(ds.check_image(i, decode=decode) for i in range(len(ds)))
        else:
            readable = len(ds)
        rep = ds.report
        print(f"  {rep.num_images} images listed, {readable} readable; {rep.boxes_in} boxes read, "
              f"{rep.boxes_kept} kept as targets, {rep.dropped_boxes} dropped or excluded; {len(ds.classes)} classes",
              file=out)
        print("\n  problems:", file=out)
        print(rep.problems_table(), file=out)
        print("\n  classes:", file=out)
        print(rep.class_table(ds.classes), file=out)
        print("\n  box sizes:", file=out)
        print(rep.size_table(), file=out)
        if readable == 0:
            problems.append(f"split {split!r} has no readable image")
        elif split == splits[0] and rep.boxes_kept == 0:
            problems.append(f"split {split!r} has no usable box")
        if split == splits[0]:
            print_recipe(ds, out)
    if problems:
        print("\nNOT usable: " + "; ".join(problems), file=out)
        return 1
    print("\nusable", file=out)
    return 0


def print_recipe(dataset: object, out: TextIO) -> None:
    """What ``configs/lwdetr_own_data.yaml`` would derive from this (training) split, with the objects-per-image
    histogram and the warnings of :func:`detkit.engine.recipe.derive_recipe`."""
    from detkit.data.report import format_table
    from detkit.engine.recipe import OWN_DATA_TREE, data_stats, derive_recipe, histogram

    stats = data_stats(dataset)
    total = max(stats.num_images, 1)
    rows = [("objects", "images", "share")]
    rows += [(label, str(n), f"{100 * n / total:5.1f}% {'#' * round(20 * n / total)}")
             for label, n in histogram(stats.objects_per_image)]
    print("\n  objects per image:", file=out)
    print(format_table(rows), file=out)
    print(f"  at most {stats.max_objects} objects in one image, {stats.num_objects / total:.1f} on average", file=out)
    recipe = derive_recipe(OWN_DATA_TREE, stats)
    print("\n  training from scratch with configs/lwdetr_own_data.yaml would choose:", file=out)
    for choice in recipe.choices:
        print(f"    {choice}", file=out)
    for warning in recipe.warnings:
        print(f"  warning: {warning}", file=out)


def synth(out_dir: Path, num_train: int = 200, num_val: int = 50, size: int = 320, seed: int = 0,
          shapes: list[str] | None = None, out: TextIO | None = None) -> int:
    from detkit.data.datasets.synthetic import synthetic, write_coco

    out = out or sys.stdout
    out_dir = out_dir.expanduser()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"output folder {out_dir} exists and is not empty; choose a new folder")
    opts = {"image_size": size, "num_train": num_train, "num_val": num_val, "seed": seed}
    if shapes:
        opts["shapes"] = shapes
    datasets = {split: synthetic(split=split, **opts) for split in ("train", "val")}
    written = write_coco(datasets, out_dir)
    for split, path in written.items():
        print(f"{split}: {len(datasets[split])} images -> {out_dir / f'{split}2017'}, annotations {path}", file=out)
    print(f"read it back with: data.format=coco data.root={out_dir}", file=out)
    return 0
