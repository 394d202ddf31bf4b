"""GPU section of the benchmark suite (``bench/run.py --device cuda``).

- training throughput (images/s) of the trainer's step (forward, loss with matching, backward, clip 0.1, fused
  AdamW) in fp32 and in bf16 autocast: DETR-R50 at batch 8, 800x800 and LW-DETR-tiny at batch 16, 640x640 with its
  13 query groups;
- LW-DETR-tiny inference: latency at batch 1 and throughput at batch 32 (640x640, fp32 and bf16) for eager,
  ``torch.compile`` (inductor's default mode; max-autotune would spend minutes per shape) and ``torch.compile`` with
  CUDA graphs (``mode="reduce-overhead"``).

``--sections gpu-training`` and ``--sections gpu-inference`` run the two halves in separate commands.

Every function also runs on the CPU (the unit tests drive them on tiny shapes); on a GPU the timings synchronise
the device around each timed region.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.common import time_one

#: case -> (config, batch, height, width) of the training-throughput table
TRAIN_CASES: dict[str, tuple[str, int, int, int]] = {
    "detr_r50": ("detr_r50.yaml", 8, 800, 800),
    "lwdetr_tiny": ("lwdetr_tiny_coco.yaml", 16, 640, 640),
}
#: inference variants of LW-DETR-tiny: name -> torch.compile kwargs (None = eager)
COMPILE_MODES: dict[str, dict[str, Any] | None] = {
    "eager": None,
    "torch.compile": {"fullgraph": True, "dynamic": False},
    "torch.compile + CUDA graphs": {"mode": "reduce-overhead", "fullgraph": True, "dynamic": False},
}
AMP_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def train_throughput(config: str, batch: int, height: int, width: int, amp: torch.dtype | None, device: str,
                     iters: int = 10, warmup: int = 3, overrides: list[str] | None = None) -> dict[str, float]:
    """Images/s of the trainer's training step at ``batch`` x ``height`` x ``width`` (8 objects per image)."""
    from bench.training import detkit_training_step

    step, _ = detkit_training_step(config, batch, height, width, device, amp=amp, overrides=overrides)
    t = time_one(step, iters, warmup, device)
    return {"images_per_s": batch / t.median, "step_ms": t.median * 1e3}


def inference_speed(config: str, batch: int, height: int, width: int, mode: str, amp: torch.dtype | None,
                    device: str, iters: int = 20, warmup: int = 5, overrides: list[str] | None = None
                    ) -> dict[str, float]:
    """Latency (ms per forward) and throughput (images/s) of the optimised eval model, compiled per ``mode``
    (a key of :data:`COMPILE_MODES`). The first (compiling) calls are part of the warm-up, not of the timing."""
    from bench.backends import RawOutputs, optimized_copy
    from bench.models import build_detkit

    model = RawOutputs(optimized_copy(build_detkit(config, overrides, device=device)))
    kwargs = COMPILE_MODES[mode]
    fn = torch.compile(model, **kwargs) if kwargs is not None else model
    images = torch.randn(batch, 3, height, width, device=device)

    def run() -> None:
        with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=amp, enabled=amp is not None):
            fn(images)

    t = time_one(run, iters, warmup, device)
    return {"latency_ms": t.median * 1e3, "images_per_s": batch / t.median}


def bench_gpu(device: str, quick: bool, parts: set[str] | None = None) -> dict[str, Any]:
    """The figures of the GPU section's ``parts`` (``training``, ``inference``; default both); a failing entry
    records its error and the others still run."""
    parts = {"training", "inference"} if parts is None else parts
    iters = 5 if quick else 20
    res: dict[str, Any] = {"training": {}, "inference": {}}
    for case, (config, batch, h, w) in TRAIN_CASES.items() if "training" in parts else ():
        for amp_name, amp in AMP_DTYPES.items():
            key = f"{case} {amp_name}"
            try:
                res["training"][key] = {"batch": batch, "input": f"{h}x{w}",
                                        **train_throughput(config, batch, h, w, amp, device, iters=iters)}
            except Exception as e:  # noqa: BLE001 - reported in the table
                res["training"][key] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            _empty_cache(device)
    for mode in COMPILE_MODES if "inference" in parts else ():
        for amp_name, amp in AMP_DTYPES.items():
            for batch in (1, 32):
                key = f"{mode} {amp_name} batch {batch}"
                try:
                    res["inference"][key] = {"batch": batch, "mode": mode, "amp": amp_name, **inference_speed(
                        "lwdetr_tiny_coco.yaml", batch, 640, 640, mode, amp, device, iters=iters * 5)}
                except Exception as e:  # noqa: BLE001
                    res["inference"][key] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                _empty_cache(device)
    return res


def _empty_cache(device: str) -> None:
    torch._dynamo.reset()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def report_gpu(res: dict[str, Any]) -> list[str]:
    """Markdown lines of the GPU section."""
    from bench.common import table

    lines = ["## 4. GPU", "", "Training throughput (the trainer's step: forward, loss with matching, backward, clip "
             "0.1, the trainer's AdamW; 8 objects per image):", ""]
    rows = []
    for key, r in res.get("training", {}).items():
        case, amp = key.rsplit(" ", 1)
        if "error" in r:
            rows.append([case, amp, "", "", "error: " + r["error"]])
        else:
            rows.append([case, amp, f"{r['batch']} x {r['input']}", f"{r['step_ms']:.1f}", f"{r['images_per_s']:.1f}"])
    lines += [table(["model", "precision", "batch x input", "step ms", "images/s"], rows), ""]
    lines += ["LW-DETR-tiny inference at 640x640 (optimised eval model; latency = one forward of the batch):", ""]
    rows = []
    for r in res.get("inference", {}).values():
        if "error" in r:
            rows.append(["", "", "", "error: " + r["error"], ""])
        else:
            rows.append([r["mode"], r["amp"], r["batch"], f"{r['latency_ms']:.2f}", f"{r['images_per_s']:.0f}"])
    lines += [table(["implementation", "precision", "batch", "latency ms", "images/s"], rows), "",
              "Goal: LW-DETR-tiny batch-1 latency <= 2.0 ms on an H100 (the paper's TensorRT FP16 figure on a T4).", ""]
    return lines
