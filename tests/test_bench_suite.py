"""Smoke tests of the benchmark suite's helpers (``bench/``) on tiny shapes; the suite itself is not run here."""

from __future__ import annotations

import argparse

import pytest
import torch

from bench import micro
from bench.common import Timing, table, time_interleaved
from bench.run import parse_args, report


def test_time_interleaved_runs_round_robin() -> None:
    calls: list[str] = []
    out = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert [len(t.samples) for t in out.values()] == [3, 3]
    t = Timing("x", [3.0, 1.0, 2.0])
    assert t.median == 2.0 and t.spread == (1.0, 3.0)


def test_deform_micro_benchmark_runs_on_a_tiny_shape(monkeypatch) -> None:
    monkeypatch.setitem(micro.DEFORM_SHAPES, "tiny", {"batch": 1, "queries": 5, "heads": 2, "head_dim": 4,
                                                      "levels": [(4, 4), (2, 2)], "points": 2})
    res = micro.bench_deform("tiny", repeats=1, warmup=0, with_hf=False)
    assert res["detkit"]["forward"].median > 0 and res["detkit"]["forward+backward"].median > 0


def test_matching_case_shapes() -> None:
    outputs, targets = micro.matching_case(batch=2, groups=3, queries=4, objects=5, classes=7)
    assert outputs["pred_logits"].shape == (2, 12, 7) and outputs["pred_boxes"].shape == (2, 12, 4)
    assert [len(t["labels"]) for t in targets] == [5, 5]


def test_coco_eval_libraries_agree_on_small_data() -> None:
    res = micro.bench_coco_eval(20)
    ap = res["pycocotools"]["AP"]
    assert 0.0 < ap < 1.0
    if res.get("faster-coco-eval") is not None:
        assert res["faster-coco-eval"]["AP"] == pytest.approx(ap, abs=1e-4)


def test_report_renders_every_section() -> None:
    args = parse_args(["--quick", "--no-compile"])
    args.notes = ""
    t = {"detkit eager": Timing("a", [0.2]), "HF transformers": Timing("b", [0.4])}
    results = {
        "inference": {"lwdetr_tiny": {"input": "640x640", "timings": t, "params_detkit": 1, "params_hf": 1,
                                      "notes": []}},
        "training": {"lwdetr_tiny": {"input": "640x640", "timings": {"detkit": Timing("a", [1.0]),
                                                                     "HF transformers": Timing("b", [2.0])},
                                     "memory": {"detkit": {"peak_rss_mb": 900.0, "rss_before_build_mb": 400.0},
                                                "hf": {"error": "boom"}}}},
        "micro": {"matching": {"detkit": Timing("a", [0.005])}, "data": {"lwdetr_train": 50.0}, "data_samples": 4,
                  "errors": {}},
    }
    text = report({"cpu": "test"}, args, results)
    assert "| lwdetr_tiny | 640x640 | detkit eager | 200.0 (200-200) | 0.50 |" in text
    assert "| 0.50 | 900 | 500 |" in text
    assert "## 3. Component micro-benchmarks" in text and "50.0" in text
    assert table(["a"], [[1]]).splitlines() == ["| a |", "|---|", "| 1 |"]
    assert isinstance(args, argparse.Namespace) and args.repeats == 3 and torch.get_num_threads() >= 1


def test_flop_counter_counts_products_convolutions_and_attention_exactly() -> None:
    from bench.flops import count_flops

    lin, conv = torch.nn.Linear(8, 16), torch.nn.Conv2d(3, 4, 3, padding=1)
    x, img = torch.randn(5, 8), torch.randn(2, 3, 6, 6)
    q, k = torch.randn(1, 2, 7, 4), torch.randn(1, 2, 9, 4)
    counts = count_flops(lambda: (lin(x), conv(img), torch.nn.functional.scaled_dot_product_attention(q, k, k)))
    assert counts["matmul"] == 2 * 5 * 8 * 16
    assert counts["convolution"] == 2 * (2 * 4 * 6 * 6) * (3 * 3 * 3)
    assert counts["attention"] == 2 * (2 * 2 * 7 * 9 * 4)  # Q K^T and P V
    # the backward adds 2x the forward's products (weights and inputs); attention 4 products without recomputation
    qg = q.clone().requires_grad_()
    train = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(qg, k, k).sum().backward())
    assert train["attention"] == 6 * (2 * 2 * 7 * 9 * 4)
    # detkit's fused oneDNN inference kernel (conv + frozen BN + ReLU) is counted as the convolution it computes
    from torchvision.ops import FrozenBatchNorm2d

    from detkit.models.backbones.resnet import conv_bn_act

    bias_free = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    with torch.no_grad():
        assert count_flops(lambda: conv_bn_act(bias_free, FrozenBatchNorm2d(4), img)) == {
            "convolution": counts["convolution"]}


def test_floor_table_compares_the_arithmetic_at_peak_with_the_timed_rows() -> None:
    from bench.run import floor_table

    t = {"detkit eager": Timing("a", [0.4]), "detkit ONNX Runtime": Timing("b", [0.2]),
         "HF transformers": Timing("c", [0.5])}
    flops = {"detkit": {"convolution": 10e9, "matmul": 5e9, "attention": 5e9}, "HF transformers": {"matmul": 25e9}}
    text = "\n".join(floor_table({"lwdetr_tiny": {"timings": t, "flops": flops}}, peak=200.0))
    # detkit: 20 GFLOP at 200 GFLOP/s = 100 ms, against its fastest row (200 ms) and HF (500 ms)
    assert "| lwdetr_tiny | detkit ONNX Runtime | 20.0 | 10.0 / 5.0 / 5.0 | 100 | 0.50 | 0.20 |" in text
    assert "| lwdetr_tiny | HF transformers | 25.0 | 0.0 / 25.0 / 0.0 | 125 | 0.25 | 0.25 |" in text
    assert floor_table({"x": {"timings": t, "flops": flops}}, peak=None) == []


def test_gpu_section_functions_run_on_cpu_at_tiny_sizes() -> None:
    """The GPU section's training-throughput and inference functions (run here on the CPU, small models) and its
    report; ``bench/run.py --device cuda`` calls the same functions at the full sizes."""
    from bench import gpu
    from tests.test_compile import LWDETR_SMALL

    tr = gpu.train_throughput("lwdetr_tiny_coco.yaml", 2, 128, 128, torch.bfloat16, "cpu", iters=1, warmup=0,
                              overrides=LWDETR_SMALL)
    assert tr["images_per_s"] > 0 and tr["step_ms"] > 0
    inf = gpu.inference_speed("lwdetr_tiny_coco.yaml", 2, 128, 128, "eager", None, "cpu", iters=1, warmup=1,
                              overrides=LWDETR_SMALL)
    assert inf["images_per_s"] == pytest.approx(2 / (inf["latency_ms"] / 1e3))
    lines = gpu.report_gpu({"training": {"lwdetr_tiny bf16": {"batch": 2, "input": "128x128", **tr},
                                         "detr_r50 fp32": {"error": "boom"}},
                            "inference": {"eager fp32 batch 2": {"batch": 2, "mode": "eager", "amp": "fp32", **inf}}})
    text = "\n".join(lines)
    assert "| lwdetr_tiny | bf16 | 2 x 128x128 |" in text and "error: boom" in text and "| eager | fp32 | 2 |" in text
    assert parse_args([]).sections == "inference,training,micro"  # the GPU section needs --device cuda


def test_gpu_section_halves_run_separately(monkeypatch) -> None:
    """``bench_gpu`` runs only the requested parts (``--sections gpu-training`` / ``gpu-inference`` split the section
    into two commands), every training case and every inference mode, precision and batch of a part."""
    from bench import gpu

    calls: list[tuple] = []
    monkeypatch.setattr(gpu, "train_throughput", lambda config, batch, h, w, amp, device, iters: calls.append(
        ("train", config, amp)) or {"images_per_s": 1.0, "step_ms": 1.0})
    monkeypatch.setattr(gpu, "inference_speed", lambda config, batch, h, w, mode, amp, device, iters: calls.append(
        ("infer", mode, amp, batch)) or {"latency_ms": 1.0, "images_per_s": 1.0})
    monkeypatch.setattr(gpu, "_empty_cache", lambda device: None)
    res = gpu.bench_gpu("cpu", True, {"training"})
    assert {c[0] for c in calls} == {"train"} and len(res["training"]) == 4 and not res["inference"]
    calls.clear()
    res = gpu.bench_gpu("cpu", True, {"inference"})
    assert {c[0] for c in calls} == {"infer"} and len(res["inference"]) == 12 and not res["training"]
