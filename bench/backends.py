"""detkit inference variants for the benchmark: optimised eager, ``torch.compile`` and ONNX Runtime."""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn


class RawOutputs(nn.Module):
    """``images -> (pred_logits, pred_boxes)`` of a detector on unpadded images (what ONNX / compile run)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.zeros_like(images[:, 0], dtype=torch.bool)
        out = self.detector(images, mask)
        return out["pred_logits"], out["pred_boxes"]


def optimized_copy(model: nn.Module) -> nn.Module:
    from detkit.models.fuse import optimize_for_inference

    return optimize_for_inference(copy.deepcopy(model))


def compiled(model: nn.Module, images: torch.Tensor) -> Callable[[], Any]:
    """``torch.compile`` (inductor, ``fullgraph=True``, weight freezing) of the optimised model; the first call
    compiles. Freezing lets inductor constant-fold and prepack the weights for oneDNN on the CPU."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    opt = optimized_copy(model)
    fn = torch.compile(RawOutputs(opt), fullgraph=True, dynamic=False)
    return lambda: fn(images)


def onnxruntime_session(model: nn.Module, images: torch.Tensor, threads: int, device: str = "cpu"
                        ) -> Callable[[], Any]:
    """Export the optimised model (TorchScript exporter, opset 17, fixed shape) and run it with ONNX Runtime
    (all graph optimisations, ``threads`` intra-op threads, sequential execution)."""
    import onnxruntime as ort

    opt = optimized_copy(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        with torch.no_grad():
            torch.onnx.export(RawOutputs(opt), (images,), path, input_names=["images"],
                              output_names=["pred_logits", "pred_boxes"], opset_version=17, dynamo=False)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        sess = ort.InferenceSession(path, so, providers=providers)
    feed = {"images": images.detach().cpu().numpy()}
    return lambda: sess.run(None, feed)
