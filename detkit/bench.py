"""``detkit bench``: parameters, FLOPs, latency, throughput and peak memory of a detector.

::

    detkit bench configs/lwdetr_tiny_coco.yaml --height 640 --width 640 --batch 1 --threads 4 --json bench.json

What is measured, on random inputs of the given size:

- ``params``: every parameter; ``params_inference``: those an eval-mode forward uses (LW-DETR's extra training
  query groups and their two-stage heads are left out), found by back-propagating from the eval outputs;
- ``flops``: ``torch.utils.flop_counter.FlopCounterMode`` over one eval forward (a multiply-add counts 2;
  operators it has no formula for, such as ``grid_sample`` in deformable attention, count 0);
- latency of forward + post-processing (median / min / max over ``--iters`` runs after ``--warmup`` runs) and
  throughput (images per second at the median);
- peak memory: the process's peak RSS on CPU (``resource``), ``torch.cuda.max_memory_allocated`` on GPU;
- versions, device and thread count.

``--runtime onnxruntime`` exports the model to ONNX first (dynamic batch and image size, as ``detkit export``
writes it) or takes ``--onnx FILE``, and times onnxruntime on inputs of the ``--batch / --height / --width`` asked
for (a file whose input fixes another size is refused, naming both).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from detkit.errors import ConfigError, DetkitError


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def count_inference_params(model: nn.Module, images: torch.Tensor, mask: torch.Tensor) -> int:
    """Parameters an eval-mode forward reaches: back-propagate from every output tensor (including nested ones such
    as LW-DETR's two-stage outputs, whose heads select the queries) and count parameters that received a gradient;
    for embedding tables only the rows that did (a model may use a slice of its query table)."""
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            outputs = model(images, mask)
            total = sum(t.float().sum() for t in _tensors(outputs) if t.requires_grad)
            if not isinstance(total, torch.Tensor):
                return count_params(model)
            total.backward()
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        n = 0
        for p in model.parameters():
            if p.grad is None:
                continue
            if id(p) in embeddings:
                n += int((p.grad != 0).any(dim=1).sum()) * p.shape[1]
            else:
                n += p.numel()
        return n
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a nested output (``aux_outputs`` lists, ``enc_outputs`` dicts)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    mapping = _extra_flop_formulas()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=mapping)
        with torch.no_grad(), counter:
            fn()
    except AssertionError:
        # the counter's module tracker fails under no_grad when a module gets a parameter slice as input
        counter = FlopCounterMode(display=False, custom_mapping=mapping)
        with torch.enable_grad(), counter:
            fn()
    return int(counter.get_total_flops())


def _extra_flop_formulas() -> dict[Any, Callable[..., int]]:
    """torch counts the CUDA attention kernels but not the CPU flash-attention one that
    ``F.scaled_dot_product_attention`` uses on CPU; give it the same formula, so CPU and GPU counts agree."""
    from torch.utils.flop_counter import sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return {}

    def cpu_sdpa(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                 **kwargs: Any) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return {op: cpu_sdpa}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20  # KiB on Linux, bytes on macOS


def time_runs(fn: Callable[[], Any], warmup: int, iters: int, sync: Callable[[], None] = lambda: None
              ) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    import torchvision

    import detkit

    out = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "detkit": detkit.__version__, "platform": platform.platform()}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


def bench_main(argv: list[str]) -> int:
    """``detkit bench CONFIG [--checkpoint CKPT] --height H --width W --batch B --threads T ...``."""
    parser = argparse.ArgumentParser(
        prog="detkit bench",
        description="Parameters, FLOPs, latency (median/min/max), throughput, peak memory, versions and device of "
                    "CONFIG's model on random inputs of the given size.")
    parser.add_argument("config", help="YAML config whose model is measured")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--checkpoint", default=None, help="load these weights (speed does not depend on them)")
    parser.add_argument("--height", type=int, default=640)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: library default)")
    parser.add_argument("--device", default="auto",
                        help="auto (a GPU when one is usable, else the CPU) | cpu | cuda | cuda:N")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (torch runtime)")
    parser.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch")
    parser.add_argument("--onnx", default=None, help="with --runtime onnxruntime: an exported file to time")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast (torch runtime)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-flops", action="store_true")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    for name in ("height", "width", "batch", "iters"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.threads < 0:
        raise ConfigError("--warmup and --threads must be >= 0")
    if args.runtime == "onnxruntime" and (args.compile or args.device not in ("auto", "cpu")):
        raise ConfigError("--runtime onnxruntime runs on the CPU without --compile")
    if args.threads:
        torch.set_num_threads(args.threads)

    from detkit import plugins
    from detkit.config import compose, to_container
    from detkit.engine.device import resolve_device
    from detkit.engine.precision import configure_tf32
    from detkit.models.build import build_model
    from detkit.models.fuse import optimize_for_inference

    device = resolve_device("cpu" if args.runtime == "onnxruntime" else args.device)
    cfg = compose(args.config, args.overrides)
    plugins.configure(cfg.plugins.disable, cfg.plugins.imports)
    configure_tf32(bool(cfg.runtime.tf32))  # as training and evaluation run; runtime.tf32=false measures full fp32
    notes = []
    if args.checkpoint:
        from detkit.loading import load_for_inference

        loaded = load_for_inference(args.checkpoint, config=args.config, overrides=args.overrides, device=device,
                                    optimize=False)
        model = loaded.model
    else:
        model_cfg = to_container(cfg.model)
        if model_cfg.get("num_classes", "absent") is None:
            model_cfg["num_classes"] = 80
            notes.append("model.num_classes is null (set from the data set at train time); measured with 80")
        torch.manual_seed(0)
        model = build_model(model_cfg)
    model.eval().to(device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.height, args.width, generator=gen).to(device)
    mask = torch.zeros(args.batch, args.height, args.width, dtype=torch.bool, device=device)
    sizes = torch.tensor([[args.height, args.width]] * args.batch, device=device)

    params = count_params(model)
    params_inf = count_inference_params(model, images[:1], mask[:1])
    # time what the predict / eval / export tools run (parameters counted above in the trained layout)
    optimize_for_inference(model)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]

    def torch_forward(m: nn.Module, grad: bool = False) -> Callable[[], Any]:
        def run() -> Any:
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()), \
                    torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = m(images, mask)
                out = {k: v.float() for k, v in out.items() if isinstance(v, torch.Tensor)}
                return model.postprocessor(out, sizes)

        return run

    flops = None
    if not args.no_flops:
        try:
            flops = count_flops(torch_forward(model, grad=True)) // args.batch
        except Exception as e:  # the counter cannot trace every model; the rest of the benchmark still holds
            notes.append(f"FLOPs not counted: {type(e).__name__}: {e}")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.runtime == "torch":
        runner = model
        if args.compile:
            try:
                runner = torch.compile(model)
            except Exception as e:
                raise DetkitError(f"torch.compile failed: {type(e).__name__}: {e}") from e
        fn = torch_forward(runner)
        try:
            times = time_runs(fn, args.warmup if not args.compile else max(args.warmup, 2), args.iters, sync)
        except Exception as e:
            if args.compile:
                raise DetkitError(f"torch.compile failed while running the model: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''} (try without --compile)") from e
            raise
    else:
        times = _time_onnxruntime(model, args, images, sizes, notes)

    median = statistics.median(times)
    result: dict[str, Any] = {
        "config": str(args.config), "overrides": list(args.overrides), "checkpoint": args.checkpoint,
        "model": type(model).__name__, "model_type": str(cfg.model.get("type")),
        "input": {"batch": args.batch, "height": args.height, "width": args.width},
        "runtime": args.runtime, "compile": bool(args.compile), "amp": args.amp,
        "tf32": bool(cfg.runtime.tf32),  # CUDA fp32 matmuls/convolutions on TF32 (no effect on the CPU)
        "params": params, "params_inference": params_inf,
        "flops_per_image": flops, "gflops_per_image": round(flops / 1e9, 3) if flops is not None else None,
        "latency_ms": {"median": round(median * 1e3, 3), "min": round(min(times) * 1e3, 3),
                       "max": round(max(times) * 1e3, 3), "mean": round(statistics.fmean(times) * 1e3, 3)},
        "throughput_img_s": round(args.batch / median, 3),
        "warmup": args.warmup, "iters": args.iters,
        "memory": _memory(device),
        "device": {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda"
                   else cpu_name(), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
        "versions": versions(),
        "notes": notes,
    }
    print(format_result(result))
    if args.json:
        out = Path(os.path.expanduser(args.json))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"results -> {out}")
    return 0


def _memory(device: torch.device) -> dict[str, Any]:
    mem: dict[str, Any] = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if device.type == "cuda":
        mem["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return mem


def _time_onnxruntime(model: nn.Module, args: argparse.Namespace, images: torch.Tensor, sizes: torch.Tensor,
                      notes: list[str]) -> list[float]:
    from detkit.export.onnx import ExportError, export_onnx, ort_session, size_divisibility

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.onnx) if args.onnx else Path(tmp) / "model.onnx"
        if args.onnx:
            if not path.is_file():
                raise DetkitError(f"--onnx file not found: {path}")
        else:
            # as `detkit export` writes it: dynamic batch and image size
            export_onnx(model, path, args.height, args.width, batch=args.batch, dynamic="all")
            notes.append("onnxruntime timed on a fresh export (dynamic batch and image size)")
        session = ort_session(path, threads=args.threads)
        _check_input_shape(session, path, tuple(images.shape), size_divisibility(model))
        feed = {"images": images.cpu().numpy(), "orig_sizes": sizes.cpu().numpy()}
        try:
            session.run(None, feed)
        except Exception as e:
            raise ExportError(f"onnxruntime cannot run {path} on a {tuple(images.shape)} input: {e}") from e
        return time_runs(lambda: session.run(None, feed), args.warmup, args.iters)


def _check_input_shape(session: Any, path: Path, shape: tuple[int, ...], model_divisibility: int = 1) -> None:
    """Refuse, naming both, an input size that the file's ``images`` input does not take (a fixed axis, or a side
    that is not a multiple of the metadata's ``size_divisibility``, else of ``model_divisibility``)."""
    declared = next((i.shape for i in session.get_inputs() if i.name == "images"), None)
    if declared is None:
        raise DetkitError(f"{path} has no 'images' input (not a detkit export?)")
    fixed = [(axis, d) for axis, d in enumerate(declared) if isinstance(d, int) and d != shape[axis]]
    if len(declared) != len(shape) or fixed:
        wanted = "x".join(str(d) for d in shape)
        takes = "x".join(str(d) if isinstance(d, int) else "?" for d in declared)
        raise DetkitError(f"{path} takes images of {takes} (fixed where a number), not the {wanted} asked for; "
                          "export it again without --static, or pass --batch / --height / --width to match")
    source = "its metadata's size_divisibility"
    try:
        div = int(json.loads(session.get_modelmeta().custom_metadata_map.get("preprocessing", "{}"))
                  .get("size_divisibility") or 0)
    except (ValueError, TypeError, AttributeError):
        div = 0
    if not div:
        div, source = max(1, model_divisibility), "the model's backbone"
    if shape[2] % div or shape[3] % div:
        raise DetkitError(f"{path} takes image sides that are multiples of {div} ({source}); "
                          f"got --height {shape[2]} --width {shape[3]}")


def format_result(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    inp = r["input"]
    lines = [
        f"{r['model']} ({r['config']}) on {r['device']['type']} ({r['device']['name']}, {r['device']['threads']} "
        f"threads), runtime {r['runtime']}{' + compile' if r['compile'] else ''}",
        f"  precision      amp {r['amp']}, TF32 {'on' if r['tf32'] else 'off'}"
        + (" (CUDA only: no effect here)" if r["device"]["type"] != "cuda" else ""),
        f"  input          {inp['batch']}x3x{inp['height']}x{inp['width']}",
        f"  params         {r['params'] / 1e6:.3f} M (inference {r['params_inference'] / 1e6:.3f} M)",
        f"  FLOPs / image  {r['gflops_per_image']} G" if r["gflops_per_image"] is not None else "  FLOPs          -",
        f"  latency        median {lat['median']:.2f} ms  min {lat['min']:.2f}  max {lat['max']:.2f} "
        f"({r['iters']} runs after {r['warmup']} warm-up)",
        f"  throughput     {r['throughput_img_s']:.2f} images/s",
        f"  peak memory    RSS {r['memory']['peak_rss_mb']:.0f} MiB"
        + (f", CUDA {r['memory']['cuda_max_allocated_mb']:.0f} MiB" if "cuda_max_allocated_mb" in r["memory"] else ""),
        "  versions       " + ", ".join(f"{k} {v}" for k, v in r["versions"].items() if k != "platform"),
    ]
    lines += [f"  note: {n}" for n in r["notes"]]
    return "\n".join(lines)
