#!/usr/bin/env python
"""detkit benchmark suite: detkit versus HuggingFace transformers, side by side in one process run.

    python bench/run.py [--quick] [--out bench/RESULTS.md] [--device cpu|cuda] [--threads 2]
                        [--sections inference,training,micro] [--no-compile] [--no-onnx]

Sections:
1. inference latency (fp32, batch 1, eval): DETR-R50 at 800x1088, LW-DETR tiny and small at 640x640: detkit eager,
   detkit eager after :func:`detkit.models.fuse.optimize_for_inference`, detkit with ``torch.compile``, detkit through
   ONNX Runtime, and the HF transformers models built from equivalent configs;
2. training step (forward, loss with matching, backward, gradient clipping, AdamW) at batch 2: DETR-R50 at 512x512,
   LW-DETR tiny at 640x640 with 13 query groups; peak resident memory of each in its own child process.
   Both sections also give each case's arithmetic floor (:mod:`bench.flops`): its matrix-product FLOPs over the
   best fp32 GEMM rate measured in the same run;
3. micro-benchmarks: deformable attention forward/backward (LW-DETR tiny and large training shapes), Hungarian
   matching (13 groups x 8 images x 100 queries x 20 objects), the data pipeline (images/s of one worker), COCO
   evaluation (5,000 images x 100 detections) with pycocotools and faster-coco-eval;
4. ``--device cuda`` only (:mod:`bench.gpu`): training images/s (DETR-R50 batch 8 at 800 px, LW-DETR-tiny batch 16
   at 640 px; fp32 and bf16 autocast) and LW-DETR-tiny inference latency (batch 1) and throughput (batch 32), eager,
   ``torch.compile`` and ``torch.compile`` with CUDA graphs.

Every figure is a median over repeated runs after warm-up; candidates of one table are timed round-robin (A B C A B C
...) so that they share the machine's noise, and every ratio comes from the same run. ``--quick`` uses fewer repeats
and smaller evaluation / data sizes (a smoke run of the whole suite).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    Timing,
    fmt_ratio,
    machine_info,
    peak_rss_mb,
    rss_mb,
    table,
    time_interleaved,
    trim_memory,
)
from bench.flops import KINDS, count_flops, gemm_peak_gflops  # noqa: E402
from bench.training import TRAINING_CASES, training_step_fns  # noqa: E402
from detkit.engine.precision import configure_tf32  # noqa: E402

INFERENCE_CASES = {"detr_r50": (800, 1088), "lwdetr_tiny": (640, 640), "lwdetr_small": (640, 640)}
HF = "HF transformers"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------------------
# 1. inference
def max_abs_diff(a: Any, b: Any) -> float:
    a_l, a_b = (a["pred_logits"], a["pred_boxes"]) if isinstance(a, dict) else a[:2]
    b_l, b_b = (b["pred_logits"], b["pred_boxes"]) if isinstance(b, dict) else b[:2]
    return max(float((torch.as_tensor(x).float().cpu() - torch.as_tensor(y).float().cpu()).abs().max())
               for x, y in ((a_l, b_l), (a_b, b_b)))


def bench_inference(case: str, args: argparse.Namespace) -> dict[str, Any]:
    from bench.backends import compiled, onnxruntime_session, optimized_copy
    from bench.models import count_params, inference_pair

    h, w = INFERENCE_CASES[case]
    pair = inference_pair(case, h, w, device=args.device, with_hf=have_transformers())
    res: dict[str, Any] = {"input": f"{h}x{w}", "params_detkit": count_params(pair.detkit), "notes": []}
    if pair.hf is not None:
        res["params_hf"] = count_params(pair.hf)
    cands = {"detkit eager": pair.detkit_fn()}
    with torch.inference_mode():
        ref = pair.detkit(pair.images, pair.mask)
        opt = optimized_copy(pair.detkit)
        cands["detkit eager + optimize_for_inference"] = pair.detkit_fn(opt)
        res["max_abs_diff_optimized"] = max_abs_diff(ref, opt(pair.images, pair.mask))
        if not args.no_compile:
            try:
                fn = compiled(pair.detkit, pair.images)
                t0 = time.perf_counter()
                out = fn()
                res["compile_s"] = time.perf_counter() - t0
                res["max_abs_diff_compile"] = max_abs_diff(ref, out)
                cands["detkit torch.compile"] = fn
            except Exception as e:  # noqa: BLE001 - reported in the table
                res["notes"].append(f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}")
                traceback.print_exc()
        if not args.no_onnx:
            try:
                fn = onnxruntime_session(pair.detkit, pair.images, args.threads, args.device)
                res["max_abs_diff_onnx"] = max_abs_diff(ref, fn())
                cands["detkit ONNX Runtime"] = fn
            except Exception as e:  # noqa: BLE001
                res["notes"].append(f"ONNX Runtime failed: {type(e).__name__}: {str(e)[:200]}")
                traceback.print_exc()
        if pair.hf is not None:
            cands[HF] = pair.hf_fn()
        log(f"inference {case}: timing {list(cands)}")
        res["timings"] = time_interleaved(cands, args.repeats, args.warmup, args.device)
    res["flops"] = {"detkit": count_flops(pair.detkit_fn())}
    if pair.hf is not None:
        res["flops"][HF] = count_flops(pair.hf_fn())
    return res


# ----------------------------------------------------------------------------------------------------------------------
# 2. training
def train_child(case: str, impl: str, steps: int, threads: int, device: str) -> dict[str, Any]:
    """Run in a fresh process: build, ``steps`` training steps; peak RSS (``VmHWM``) and step times."""
    torch.set_num_threads(threads)
    if have_transformers():
        import transformers  # noqa: F401 - same imports (and baseline RSS) for both implementations
    import detkit.models.build  # noqa: F401

    base = rss_mb()
    step, _ = training_step_fns(case, impl, device)
    built = rss_mb()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = peak_rss_mb()
    return {"rss_before_build_mb": base, "rss_after_build_mb": built, "peak_rss_mb": peak, "step_s": times}


def bench_training(case: str, args: argparse.Namespace) -> dict[str, Any]:
    impls = ["detkit"] + (["hf"] if have_transformers() else [])
    res: dict[str, Any] = {"input": "{1}x{2}".format(*TRAINING_CASES[case]), "memory": {}}
    for impl in impls:
        log(f"training {case}: memory child for {impl}")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-train", case, impl, "--threads",
               str(args.threads), "--device", args.device, "--child-steps", "2"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        res["memory"][impl] = json.loads(line[-1]) if proc.returncode == 0 and line else {"error": proc.stderr[-800:]}
    fns = {}
    for impl in impls:
        step, _ = training_step_fns(case, impl, args.device)
        fns["detkit" if impl == "detkit" else HF] = step
    log(f"training {case}: timing {list(fns)}")
    res["timings"] = time_interleaved(fns, args.train_repeats, 1, args.device)
    res["flops"] = {name: count_flops(step) for name, step in fns.items()}
    del fns
    trim_memory()
    return res


# ----------------------------------------------------------------------------------------------------------------------
# report
def _ms(t: Timing) -> str:
    return t.ms()


def floor_table(section: dict[str, Any], peak: float | None) -> list[str]:
    """Each case's FLOPs and the time they take at the measured GEMM peak, against the timed rows (detkit's fastest
    row for detkit)."""
    rows = []
    for case, r in section.items():
        flops, t = r.get("flops"), r.get("timings")
        if not flops or not t or not peak:
            continue
        for name, by_kind in flops.items():
            total = sum(by_kind.values())
            floor_s = total / (peak * 1e9)
            kinds = " / ".join(f"{by_kind.get(k, 0) / 1e9:.1f}" for k in KINDS)
            own = [k for k in t if (k.startswith("detkit") if name == "detkit" else k == name)]
            label = min(own, key=lambda k: t[k].median, default=name)
            row, hf = t.get(label), t.get(HF)
            rows.append([case, label, f"{total / 1e9:.1f}", kinds, f"{floor_s * 1e3:.0f}",
                         fmt_ratio(floor_s, row.median) if row else "n/a",
                         fmt_ratio(floor_s, hf.median) if hf else "n/a"])
    if not rows:
        return []
    return [f"Arithmetic floor: the FLOPs of the matrix products, convolutions and attention (`bench/flops.py`) at "
            f"the best fp32 GEMM rate measured in this run, {peak:.0f} GFLOP/s. Elementwise work, softmax and memory "
            "traffic are left out, so no implementation reaches it. `floor / its time` is how close a row gets; on a "
            "detkit row, `floor / HF` is the lowest ratio to HF that detkit's arithmetic allows on this machine.", "",
            table(["model", "implementation (detkit: its fastest row)", "GFLOP", "conv / matmul / attention",
                   "floor ms", "floor / its time", "floor / HF"], rows), ""]


def report(info: dict[str, str], args: argparse.Namespace, results: dict[str, Any]) -> str:
    lines = ["# detkit benchmark results", "",
             f"Command: `python bench/run.py {' '.join(args.argv)}`".replace("  ", " "), "",
             "Machine, versions and settings:", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", "Times are medians in milliseconds, with (min-max) over the timed runs; candidates of a table were "
              "timed round-robin in the same process, and ratios are detkit / HF transformers from the same run. "
              f"Repeats: inference {args.repeats} after {args.warmup} warm-up, training {args.train_repeats} after 1.",
              ""]
    inf = results.get("inference", {})
    if inf:
        lines += ["## 1. Inference latency (fp32, batch 1, eval)", ""]
        rows = []
        for case, r in inf.items():
            if "error" in r:
                rows.append([case, "", "error: " + r["error"], "", ""])
                continue
            t = r["timings"]
            hf = t.get(HF)
            for name, tm in t.items():
                diff = {"detkit eager + optimize_for_inference": r.get("max_abs_diff_optimized"),
                        "detkit torch.compile": r.get("max_abs_diff_compile"),
                        "detkit ONNX Runtime": r.get("max_abs_diff_onnx")}.get(name)
                rows.append([case, r["input"], name, _ms(tm),
                             fmt_ratio(tm.median, hf.median) if hf is not None else "n/a",
                             "" if diff is None else f"{diff:.1e}"])
        lines += [table(["model", "input", "implementation", "latency ms", "ratio to HF", "max abs diff vs eager"],
                        rows), ""]
        for case, r in inf.items():
            extra = []
            if "params_detkit" in r:
                extra.append(f"parameters detkit {r['params_detkit']:,}" +
                             (f", HF {r['params_hf']:,}" if "params_hf" in r else ""))
            if "compile_s" in r:
                extra.append(f"torch.compile first call {r['compile_s']:.0f} s")
            extra += r.get("notes", [])
            if extra:
                lines.append(f"- {case}: " + "; ".join(extra))
        lines.append("")
        lines += floor_table(inf, results.get("gemm_peak_gflops"))
    tr = results.get("training", {})
    if tr:
        lines += ["## 2. Training step (batch 2: forward, loss with matching, backward, clip 0.1, AdamW)", ""]
        rows = []
        for case, r in tr.items():
            if "error" in r:
                rows.append([case, "", "error: " + r["error"], "", "", ""])
                continue
            t = r["timings"]
            hf = t.get(HF)
            for name, tm in t.items():
                mem = r["memory"].get("detkit" if name == "detkit" else "hf", {})
                peak = f"{mem['peak_rss_mb']:.0f}" if "peak_rss_mb" in mem else mem.get("error", "n/a")[-80:]
                grow = (f"{mem['peak_rss_mb'] - mem['rss_before_build_mb']:.0f}" if "peak_rss_mb" in mem else "n/a")
                rows.append([case, r["input"], name, _ms(tm), fmt_ratio(tm.median, hf.median) if hf else "n/a",
                             peak, grow])
        lines += [table(["model", "input", "implementation", "step ms", "ratio to HF", "peak RSS MiB",
                         "peak RSS above imports MiB"], rows), ""]
        lines += ["Peak RSS is the high-water mark (`VmHWM`) of a fresh child process per implementation that imports the same modules "
                  "(torch, transformers, detkit), builds the model and optimizer and runs 2 steps.", ""]
        lines += floor_table(tr, results.get("gemm_peak_gflops"))
    mi = results.get("micro", {})
    if mi:
        lines += ["## 3. Component micro-benchmarks", ""]
        if "deform" in mi:
            rows = []
            for shape, impls in mi["deform"].items():
                for name, t in impls.items():
                    for label, suffix in (("wall, 2 threads", ""), ("CPU time, 1 thread", " cpu-time 1 thread")):
                        if "forward" + suffix not in t:
                            continue
                        f, fb = t["forward" + suffix].median, t["forward+backward" + suffix].median
                        rows.append([shape, name, label, f"{f * 1e3:.1f}", f"{fb * 1e3:.1f}", f"{(fb - f) * 1e3:.1f}",
                                     f"{(fb - f) / f:.2f}"])
            lines += ["Multi-scale deformable attention (sampling core: value (B, S, H, Dh), locations, weights -> "
                      "(B, Q, H*Dh)), training shapes at 640x640. The CPU-time rows time the calling thread with one "
                      "intra-op thread, which preemption by other processes does not inflate:", "",
                      table(["shape", "implementation", "clock", "forward ms", "forward+backward ms", "backward ms",
                             "backward / forward"], rows), ""]
            from bench.micro import DEFORM_SHAPES

            lines += ["Shapes: " + "; ".join(f"{k}: B={v['batch']}, Q={v['queries']}, heads={v['heads']}x"
                                              f"{v['head_dim']}, levels={v['levels']}, points={v['points']}"
                                              for k, v in DEFORM_SHAPES.items()), ""]
        if "matching" in mi:
            t = mi["matching"]
            hf = t.get(HF)
            hf_cpu = t.get(HF + " (CPU time, 1 thread)")
            rows = [[n, _ms(tm), fmt_ratio(tm.median, (hf_cpu if "CPU time" in n else hf).median) if hf else "n/a"]
                    for n, tm in t.items()]
            lines += ["Hungarian matching, 13 groups x 8 images x 100 queries x 20 objects, 91 classes (focal cost, "
                      "total per call):", "", table(["implementation", "ms", "ratio to HF"], rows), ""]
        if "data" in mi:
            rows = [[k, f"{v:.1f}"] for k, v in mi["data"].items()]
            lines += [f"Data pipeline, one worker (1 thread), JPEG 640x480 decode + augmentation + normalisation "
                      f"({mi['data_samples']} samples):", "", table(["transforms", "images/s"], rows), ""]
        if "coco" in mi:
            c = mi["coco"]
            rows = []
            for name in ("pycocotools", "faster-coco-eval"):
                v = c.get(name)
                rows.append([name, "not installed (skipped)", "", ""] if v is None else
                            [name, f"{v['seconds']:.2f}", f"{v['AP']:.4f}",
                             fmt_ratio(v["seconds"], c["pycocotools"]["seconds"])])
            lines += [f"COCO bbox evaluation (loadRes + evaluate + accumulate + summarize), {mi['coco_images']} "
                      "images x 100 detections, 7 GT boxes each:", "",
                      table(["library", "seconds", "AP", "ratio to pycocotools"], rows), ""]
        for k, v in mi.get("errors", {}).items():
            lines.append(f"- {k} failed: {v}")
    if results.get("gpu"):
        from bench.gpu import report_gpu

        lines += report_gpu(results["gpu"])
    if args.notes and Path(args.notes).is_file():
        lines += ["", Path(args.notes).read_text().rstrip()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, smaller COCO-eval/data sizes")
    p.add_argument("--out", default=None, help="write the markdown report here (default: print only)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (and ORT intra-op threads)")
    p.add_argument("--sections", default=None,
                   help="comma list of inference, training, micro, gpu (= gpu-training + gpu-inference, to run in two "
                        "commands where one is time-limited) (default: all; gpu only with --device cuda)")
    p.add_argument("--cases", default=None, help="comma list restricting the model cases (e.g. lwdetr_tiny)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--notes", default=str(Path(__file__).with_name("NOTES.md")),
                   help="markdown appended to the report (equivalence notes)")
    p.add_argument("--child-train", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    p.add_argument("--child-steps", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = argv
    args.warmup = 1 if args.quick else 2
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    args.train_repeats = 2 if args.quick else 5
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.sections is None:
        args.sections = "inference,training,micro" + (",gpu" if args.device == "cuda" else "")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    configure_tf32(True)  # what the tools run with by default (runtime.tf32)
    if args.child_train:
        print(json.dumps(train_child(*args.child_train, args.child_steps, args.threads, args.device)))
        return 0
    sections = set(args.sections.split(","))
    cases = set(args.cases.split(",")) if args.cases else None
    info = machine_info(args.device, args.threads)
    info["tf32"] = "on (CUDA fp32 matmuls and convolutions; no effect on the CPU)"
    results: dict[str, Any] = {}
    if {"inference", "training"} & sections:
        results["gemm_peak_gflops"] = gemm_peak_gflops(device=args.device)
    if "inference" in sections:
        results["inference"] = {}
        for case in INFERENCE_CASES:
            if cases and case not in cases:
                continue
            log(f"inference {case}")
            try:
                results["inference"][case] = bench_inference(case, args)
            except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
                traceback.print_exc()
                results["inference"][case] = {"error": f"{type(e).__name__}: {e}"}
            trim_memory()
    if "training" in sections:
        results["training"] = {}
        for case in TRAINING_CASES:
            if cases and case not in cases:
                continue
            log(f"training {case}")
            try:
                results["training"][case] = bench_training(case, args)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                results["training"][case] = {"error": f"{type(e).__name__}: {e}"}
            trim_memory()
    if "gemm_peak_gflops" in results:  # the best of two readings, before and after the model sections
        results["gemm_peak_gflops"] = max(results["gemm_peak_gflops"], gemm_peak_gflops(device=args.device))
    gpu_parts = {part for part in ("training", "inference") if {"gpu", f"gpu-{part}"} & sections}
    if gpu_parts:
        from bench.gpu import bench_gpu

        log(f"gpu section: {', '.join(sorted(gpu_parts))}")
        results["gpu"] = bench_gpu(args.device, args.quick, gpu_parts)
    if "micro" in sections:
        from bench import micro

        mi: dict[str, Any] = {"errors": {}}
        results["micro"] = mi
        steps = [
            ("deform", lambda: {s: micro.bench_deform(s, args.repeats, args.warmup, args.device)
                                for s in micro.DEFORM_SHAPES}),
            ("matching", lambda: micro.bench_matching(max(args.repeats, 5), args.warmup)),
            ("data", lambda: micro.bench_data_pipeline(mi.setdefault("data_samples", 24 if args.quick else 120))),
            ("coco", lambda: micro.bench_coco_eval(mi.setdefault("coco_images", 500 if args.quick else 5000))),
        ]
        for name, fn in steps:
            log(f"micro {name}")
            try:
                mi[name] = fn()
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                mi["errors"][name] = f"{type(e).__name__}: {e}"
    text = report(info, args, results)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
