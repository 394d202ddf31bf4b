"""ONNX export with post-processing inside, self-checked with onnxruntime (``detkit export``).

The exported graph::

    images      float32 (B, 3, H, W)  RGB, scaled to [0, 1] then normalised with the ImageNet mean / std
    orig_sizes  int64   (B, 2)        (h, w) of each original image: boxes come back in its pixels
    ->
    scores      float32 (B, K)
    labels      int64   (B, K)        class index (names in the metadata)
    boxes       float32 (B, K, 4)     x1, y1, x2, y2 in original pixels

Batch, height and width are dynamic (LW-DETR: height and width must be multiples of the ViT's 64; DETR: any).
``K`` is the number of queries (DETR: best class per query) or ``num_select`` (LW-DETR: top-k of every
query-class pair). The model's ``metadata_props`` hold ``classes`` (JSON list), ``preprocessing`` (JSON: colour
order, resize node of the evaluation transform, mean, std, size divisibility), ``model_type``, ``num_classes``,
``score`` (softmax / sigmoid), ``outputs`` and ``detkit_version``.

After writing, the file is run with onnxruntime against PyTorch at two batch sizes and two resolutions; a maximum
absolute difference above ``tolerance`` (scores, and boxes divided by the image size) is an :class:`ExportError`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from detkit.errors import ConfigError, DetkitError

log = logging.getLogger("detkit.export")

INPUT_NAMES = ["images", "orig_sizes"]
OUTPUT_NAMES = ["scores", "labels", "boxes"]


class ExportError(DetkitError):
    """The export failed, or the exported model disagrees with PyTorch."""


def batched_postprocess(postprocessor: nn.Module, outputs: Mapping[str, Tensor], orig_sizes: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """The detector's post-processing as batched tensors ``scores (B, K)``, ``labels (B, K)``, ``boxes (B, K, 4)``
    (the modules return one dict per image, which a traced graph would unroll to a fixed batch).

    detkit's post-processors (and those of plugins that want a dynamic batch) provide ``forward_batched(outputs,
    orig_sizes)``, the very code their per-image ``forward`` runs, so evaluation, prediction and the exported graph
    give the same (clipped) boxes; others are run as they are and stacked (the batch size is then fixed in the
    graph)."""
    batched = getattr(postprocessor, "forward_batched", None)
    if callable(batched):
        return batched(outputs, orig_sizes)
    results = postprocessor(outputs, orig_sizes)
    return (torch.stack([r["scores"] for r in results]), torch.stack([r["labels"] for r in results]),
            torch.stack([r["boxes"] for r in results]))


class ExportModel(nn.Module):
    """``(images (B, 3, H, W), orig_sizes (B, 2)) -> (scores, labels, boxes)``: a detector with its post-processing,
    for images of one size (no padding mask)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector.eval()

    def forward(self, images: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mask = torch.zeros_like(images[:, 0], dtype=torch.bool)
        outputs = self.detector(images, mask)
        scores, labels, boxes = batched_postprocess(self.detector.postprocessor, outputs, orig_sizes)
        return scores, labels.to(torch.int64), boxes


def size_divisibility(model: nn.Module) -> int:
    return int(getattr(getattr(model, "backbone", None), "size_divisibility", 1) or 1)


def preprocessing_metadata(val_transforms: Mapping[str, Any] | None, divisibility: int) -> dict[str, Any]:
    from detkit.data.datasets.base import IMAGENET_MEAN, IMAGENET_STD

    return {
        "color": "RGB", "layout": "NCHW", "dtype": "float32", "scale": 1 / 255,
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "resize": dict(val_transforms) if val_transforms else None,
        "size_divisibility": divisibility,
        "note": "resize as 'resize' says (a detkit TRANSFORMS node), x/255, (x - mean) / std; pass the original "
                "(h, w) as orig_sizes to get boxes in original pixels",
    }


DYNAMIC_MODES = ("all", "batch", "none")


def export_onnx(model: nn.Module, path: str | os.PathLike[str], height: int, width: int, batch: int = 1,
                opset: int = 17, dynamic: str = "all", metadata: Mapping[str, Any] | None = None) -> Path:
    """Trace ``model`` (a detkit detector) with its post-processing into ONNX at ``path``.

    :param height, width, batch: the example input used for tracing.
    :param dynamic: ``all`` (dynamic batch, height and width), ``batch`` (dynamic batch only) or ``none``.
    :param metadata: written to ``metadata_props`` (values that are not strings as JSON).
    """
    import onnx

    if dynamic not in DYNAMIC_MODES:
        raise ConfigError(f"dynamic must be one of {', '.join(DYNAMIC_MODES)}, got {dynamic!r}")
    if opset < 17:
        raise ConfigError(f"--opset must be >= 17, got {opset}")
    div = size_divisibility(model)
    if height % div or width % div:
        raise ConfigError(f"this model needs image sides that are multiples of {div}; got {height}x{width}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportModel(model).eval()
    images = torch.randn(batch, 3, height, width)
    sizes = torch.tensor([[height, width]] * batch, dtype=torch.int64)
    dynamic_axes = None
    if dynamic != "none":
        dynamic_axes = {"images": {0: "batch", 2: "height", 3: "width"} if dynamic == "all" else {0: "batch"},
                        "orig_sizes": {0: "batch"}, "scores": {0: "batch"}, "labels": {0: "batch"},
                        "boxes": {0: "batch"}}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python values are expected and checked below
            torch.onnx.export(wrapper, (images, sizes), str(path), input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                              dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True,
                              dynamo=False)
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {type(e).__name__}: {e}") from e
    proto = onnx.load(str(path))
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key = str(key)
        entry.value = value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def fix_image_size(path: str | os.PathLike[str], height: int, width: int,
                   metadata: Mapping[str, Any] | None = None) -> None:
    """Declare a fixed ``height x width`` on the ``images`` input of an exported file (the traced graph is the same
    whichever axes were declared dynamic) and replace its metadata."""
    import onnx

    proto = onnx.load(str(path))
    dims = next(i for i in proto.graph.input if i.name == "images").type.tensor_type.shape.dim
    for axis, value in ((2, height), (3, width)):
        dims[axis].Clear()
        dims[axis].dim_value = value
    if metadata is not None:
        del proto.metadata_props[:]
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key = str(key)
            entry.value = value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """``metadata_props`` of an ONNX file as a dict of strings."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def ort_session(path: str | os.PathLike[str], threads: int = 0) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # failures surface as exceptions with their message
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def compare_outputs(ref: Sequence[np.ndarray], got: Sequence[np.ndarray], sizes: np.ndarray,
                    tie: float = 1e-4) -> dict[str, float]:
    """Max abs differences of ``scores`` and of ``boxes / image size`` between two ``(scores, labels, boxes)``.

    Rows are compared position by position; where the labels differ the row counts only if its score is not
    within ``tie`` of a neighbour (top-k may order near-equal scores either way) — such rows are reported as
    ``label_mismatch``."""
    s0, l0, b0 = (np.asarray(x) for x in ref)
    s1, l1, b1 = (np.asarray(x) for x in got)
    if s0.shape != s1.shape or b0.shape != b1.shape:
        return {"scores": float("inf"), "boxes": float("inf"), "label_mismatch": float(s0.size)}
    scale = np.concatenate([sizes[:, ::-1], sizes[:, ::-1]], axis=1).astype(np.float64)[:, None, :]
    db = np.abs(b0.astype(np.float64) - b1) / np.maximum(scale, 1)
    same = l0 == l1
    mismatch = 0
    if not same.all():
        near = np.zeros_like(same)
        near[:, 1:] |= np.abs(s0[:, 1:] - s0[:, :-1]) <= tie
        near[:, :-1] |= np.abs(s0[:, 1:] - s0[:, :-1]) <= tie
        mismatch = int((~same & ~near).sum())
    score_diff = float(np.abs(np.sort(s0, 1) - np.sort(s1, 1)).max()) if s0.size else 0.0
    box_diff = float(db[same].max()) if same.any() else 0.0
    return {"scores": score_diff, "boxes": box_diff, "label_mismatch": float(mismatch)}


def verify_onnx(path: str | os.PathLike[str], model: nn.Module, shapes: Sequence[tuple[int, int, int]],
                tolerance: float = 1e-3, seed: int = 0) -> list[dict[str, Any]]:
    """Run the ONNX file and PyTorch on the same random inputs for each ``(batch, height, width)``; return one
    record per shape with the differences, and raise :class:`ExportError` when one exceeds ``tolerance``."""
    session = ort_session(path)
    wrapper = ExportModel(model).eval()
    gen = torch.Generator().manual_seed(seed)
    records, failures = [], []
    for batch, height, width in shapes:
        images = torch.randn(batch, 3, height, width, generator=gen)
        # original sizes differ per image, so the box scaling is checked too
        sizes = torch.tensor([[height * (1 + i), width + 37 * i] for i in range(batch)], dtype=torch.int64)
        with torch.no_grad():
            ref = [t.numpy() for t in wrapper(images, sizes)]
        try:
            got = session.run(OUTPUT_NAMES, {"images": images.numpy(), "orig_sizes": sizes.numpy()})
        except Exception as e:
            raise ExportError(f"onnxruntime cannot run {path} on a {batch}x3x{height}x{width} input: {e}") from e
        diff = compare_outputs(ref, got, sizes.numpy())
        rec = {"batch": batch, "height": height, "width": width, **diff}
        records.append(rec)
        if max(diff["scores"], diff["boxes"]) > tolerance or diff["label_mismatch"] > 0:
            failures.append(rec)
    if failures:
        raise ExportError(f"the ONNX model disagrees with PyTorch (tolerance {tolerance}): " + "; ".join(
            f"batch {r['batch']} at {r['height']}x{r['width']}: scores {r['scores']:.2e}, boxes {r['boxes']:.2e}, "
            f"{int(r['label_mismatch'])} label mismatches" for r in failures))
    return records


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
    from detkit.predict import load_for_inference

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
    if mode == "none":
        records = verify_onnx(out, model, [(args.batch, height, width)], tolerance=args.tolerance)
    else:
        records = verify_onnx(out, model, [(1, height, width), (2, height, width)], tolerance=args.tolerance)
        try:
            records += verify_onnx(out, model, [(b, *other) for b in (1, 2)], tolerance=args.tolerance)
        except ExportError as e:
            # the graph has the example's spatial shapes baked in (e.g. LW-DETR's deformable attention works on a
            # static list of per-level shapes): keep a dynamic batch, fix the size, and prove the other resolution
            # with a second export
            log.debug("dynamic image size does not hold: %s", e)
            mode = "batch"
            print(f"note: {type(model).__name__} fixes the image size in the graph; the file takes a dynamic batch "
                  f"and a fixed {height}x{width} input")
            fix_image_size(out, height, width, {**meta, "dynamic": f"batch (image size fixed at {height}x{width})"})
            records = verify_onnx(out, model, [(1, height, width), (2, height, width)], tolerance=args.tolerance)
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                probe = export_onnx(model, Path(tmp) / "other.onnx", *other, opset=args.opset, dynamic=mode)
                records += verify_onnx(probe, model, [(b, *other) for b in (1, 2)], tolerance=args.tolerance)
    _print_written(out, args, height, width, mode, time.perf_counter() - t0)
    print("onnxruntime vs PyTorch (max abs difference; boxes relative to the image size):")
    for r in records:
        print(f"  batch {r['batch']}  {r['height']}x{r['width']}:  scores {r['scores']:.2e}  boxes {r['boxes']:.2e}")
    worst = max(max(r["scores"], r["boxes"]) for r in records)
    print(f"check passed: max abs difference {worst:.2e} <= {args.tolerance}")
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
