"""``detkit eval CONFIG --checkpoint CKPT``: the report of :mod:`detkit.engine.eval_report` for a checkpoint.

It prints the report as tables, writes it as JSON (``--out``) and draws the PR curves (a PNG beside it). Under
``torchrun`` every rank predicts its share of the images; rank 0 evaluates and writes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from detkit.engine.eval_report import BACKENDS, MissingDependencyError, build_report, format_report, plot_pr_curves
from detkit.errors import CheckpointError, ConfigError


def eval_main(argv: list[str]) -> int:
    """``detkit eval CONFIG --checkpoint CKPT [KEY=VALUE ...] [--out metrics.json]`` (works under torchrun)."""
    parser = argparse.ArgumentParser(
        prog="detkit eval",
        description="COCO metrics, per-class table, best-F1 thresholds, confusion matrix and PR curves of a "
                    "checkpoint on the validation split of CONFIG's data set. Multi-GPU: torchrun ... tools/eval.py")
    parser.add_argument("config", help="the YAML config (data set, model); the checkpoint's own model must fit it")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.root=...")
    parser.add_argument("--checkpoint", required=True, help="a detkit checkpoint")
    parser.add_argument("--out", default=None, help="JSON report path (default: print only); the PR curves go "
                                                   "beside it as <name>_pr.png")
    parser.add_argument("--backend", choices=BACKENDS, default="pycocotools")
    parser.add_argument("--weights", choices=("auto", "ema", "model"), default="auto",
                        help="EMA or raw weights (auto: EMA when the checkpoint has them)")
    parser.add_argument("--batch-size", type=int, default=0, help="default: train.eval_batch_size or batch_size")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: runtime.device)")
    parser.add_argument("--conf", type=float, default=0.5, help="score threshold of the confusion matrix")
    parser.add_argument("--iou", type=float, default=0.5, help="IoU threshold of best-F1 and the confusion matrix")
    parser.add_argument("--detections", default=None, help="also write the raw COCO-format detections here")
    parser.add_argument("--tile", default="0", metavar="SIZE",
                        help="predict each image from its original pixels in overlapping SIZE x SIZE tiles, merged "
                             "across the seams, as `detkit predict --tile` does (auto: only images over 2x the "
                             "model's input side); default 0: whole images, as the evaluation during training")
    parser.add_argument("--overlap", type=float, default=0.2, help="tile overlap, a fraction of SIZE (default 0.2)")
    parser.add_argument("--whole-image", action="store_true", help="with tiles, also predict the whole image")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    for name in ("conf", "iou"):
        v = getattr(args, name)
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"--{name} must be within [0, 1], got {v}")
    if args.backend == "faster-coco-eval":
        try:
            import faster_coco_eval  # noqa: F401
        except ImportError as e:
            raise MissingDependencyError(
                "--backend faster-coco-eval needs the faster-coco-eval package: pip install 'detkit[fast-eval]' "
                "(or pip install faster-coco-eval)") from e

    from detkit import plugins
    from detkit.config import compose, for_device, to_container
    from detkit.data.build import build_datasets
    from detkit.engine import distributed as du
    from detkit.engine.evaluator import predict_dataset
    from detkit.engine.precision import configure_tf32
    from detkit.engine.recipe import pending_keys, resolved_overrides
    from detkit.loading import load_for_inference
    from detkit.tiling import check_tile_options, parse_tile
    from detkit.weights.io import load_checkpoint_file

    tile = parse_tile(args.tile)
    check_tile_options(64, args.overlap)
    ckpt_path = Path(os.path.expanduser(args.checkpoint))
    if not ckpt_path.is_file():
        raise CheckpointError(f"checkpoint not found: {ckpt_path}")
    overrides = list(args.overrides)
    cfg = compose(args.config, overrides)
    if pending_keys(to_container(cfg)):  # a config that derives keys from the data: take the run's values
        overrides += resolved_overrides(to_container(cfg), load_checkpoint_file(ckpt_path).get("config"))
        cfg = compose(args.config, overrides)
    plugins.configure(cfg.plugins.disable, cfg.plugins.imports)
    info = du.init_distributed(args.device or str(cfg.runtime.device), str(cfg.runtime.dist_backend),
                               float(cfg.runtime.dist_timeout_s))
    cfg = for_device(cfg, info.device.type)  # runtime.cpu settings when evaluating on the CPU
    configure_tf32(bool(cfg.runtime.tf32))
    try:
        if cfg.runtime.threads > 0:
            import torch

            torch.set_num_threads(int(cfg.runtime.threads))
        _, val_ds = build_datasets(to_container(cfg.data), train=False)
        if len(val_ds) == 0:
            raise ConfigError("the validation split is empty: nothing to evaluate (check data.root and "
                              "data.val_split)")
        if cfg.model.get("num_classes", "absent") is None:
            overrides.append(f"model.num_classes={len(val_ds.classes)}")
        loaded = load_for_inference(ckpt_path, config=args.config, overrides=overrides, device=info.device,
                                    weights=args.weights)
        ds_classes = [str(c) for c in val_ds.classes]
        ckpt_classes = [str(c) for c in loaded.checkpoint.get("classes") or []]
        if ckpt_classes and ckpt_classes != ds_classes:
            raise CheckpointError(
                f"{ckpt_path} was trained on {len(ckpt_classes)} classes ({', '.join(ckpt_classes[:8])}"
                f"{', ...' if len(ckpt_classes) > 8 else ''}) but the data set of {args.config} has "
                f"{len(ds_classes)} ({', '.join(ds_classes[:8])}{', ...' if len(ds_classes) > 8 else ''})")
        n_model = int(getattr(loaded.model, "num_classes", len(ds_classes)))
        if n_model < len(ds_classes):
            raise CheckpointError(f"the model has {n_model} classes but the data set has {len(ds_classes)}")
        batch = args.batch_size or int(cfg.train.eval_batch_size or cfg.train.batch_size)
        t0 = time.perf_counter()
        if tile:
            detections = _predict_tiled(loaded, val_ds, tile, args.overlap, args.whole_image, batch, info.device)
        else:
            detections = predict_dataset(loaded.model, val_ds, batch_size=batch,
                                         num_workers=int(cfg.data.num_workers), device=info.device,
                                         collate_fn=getattr(val_ds, "collate_fn", None), gather=True)
        predict_time = time.perf_counter() - t0
        if not du.is_main_process():
            return 0
        coco_gt = val_ds.coco_gt()
        report, ev = build_report(coco_gt, detections, None, args.backend, args.conf, args.iou)
        report.update({"checkpoint": str(ckpt_path), "weights": loaded.weights, "config": str(args.config),
                       "overrides": list(args.overrides), "predict_time_s": round(predict_time, 3),
                       "world_size": info.world_size})
        print(format_report(report))
        if args.detections:
            Path(args.detections).parent.mkdir(parents=True, exist_ok=True)
            Path(args.detections).write_text(json.dumps(detections))
        if args.out:
            out = Path(os.path.expanduser(args.out))
            png = out.with_name(out.stem + "_pr.png")
            plot_pr_curves(ev, report, png)
            report["pr_curves_png"] = str(png)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1))
            print(f"\nreport -> {out}\nPR curves -> {png}")
        return 0
    finally:
        du.teardown()


def _predict_tiled(loaded: Any, dataset: Any, tile: int | str, overlap: float, whole_image: bool, batch_size: int,
                   device: Any) -> list[dict[str, Any]]:
    """COCO detections of every image predicted in tiles (this rank's share, gathered on every rank)."""
    from detkit.engine import distributed as du
    from detkit.predict.api import Detector
    from detkit.tiling import predict_dataset_tiled

    det = Detector(loaded.model, loaded.classes, loaded.val_transforms, threshold=0.0, batch_size=batch_size,
                   device=device, tile=tile, overlap=overlap, whole_image=whole_image)
    detections = predict_dataset_tiled(det, dataset, tile, overlap, whole_image, du.get_rank(), du.get_world_size())
    if du.is_dist():
        detections = [d for part in du.all_gather_object(detections) for d in part]
    return detections
