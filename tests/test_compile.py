"""The DETR and LW-DETR eval forward passes trace with ``torch.compile(fullgraph=True)``: no graph breaks.

The fast checks use the ``eager`` backend (Dynamo traces the whole forward into one graph, or raises on a graph
break, without code generation); one slow test compiles with inductor and compares the outputs.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from detkit import build_model, compose
from detkit.models.fuse import optimize_for_inference
from tests.conftest import CONFIGS

#: small but structurally complete variants (every code path of the full models runs)
DETR_SMALL = [
    "model.num_classes=5", "model.num_queries=10", "model.hidden_dim=32", "model.backbone.depth=18",
    "model.transformer.nhead=4", "model.transformer.num_encoder_layers=1", "model.transformer.num_decoder_layers=2",
    "model.transformer.dim_feedforward=64",
]
LWDETR_SMALL = [
    "model.num_classes=5", "model.num_queries=12", "model.group_detr=3", "model.hidden_dim=32",
    "model.backbone.embed_dim=48", "model.backbone.num_heads=4", "model.transformer.sa_heads=4",
    "model.transformer.ca_heads=4", "model.transformer.dim_feedforward=64", "model.postprocessor.num_select=10",
]

#: a shallow model keeps compiling short; the op types are those of the full model
SHALLOW = ["model.backbone.depth=2", "model.backbone.window_blocks=[0]", "model.backbone.out_indices=[1]",
           "model.transformer.num_layers=1", "model.neck.num_blocks=1"]


def _model(config: str, overrides: list[str], optimized: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(compose(CONFIGS / config, overrides).model).eval()
    return optimize_for_inference(model) if optimized else model


def _inputs(h: int, w: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(2, 3, h, w)
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    if padded:
        mask[1, :, w - 64:] = True
        images[1, :, :, w - 64:] = 0
    return images, mask


CASES = [("detr_r50.yaml", DETR_SMALL, (96, 128)), ("lwdetr_tiny_coco.yaml", LWDETR_SMALL, (128, 192))]


class _CountGraphs:
    """A Dynamo backend that counts the graphs it receives and runs them as they are."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize(("config", "overrides", "size"), CASES, ids=["detr", "lwdetr"])
def test_eval_forward_has_no_graph_breaks(config, overrides, size) -> None:
    torch._dynamo.reset()
    model = _model(config, overrides)
    images, mask = _inputs(*size, padded=True)
    backend = _CountGraphs()
    with torch.no_grad():
        ref = model(images, mask)
        # fullgraph=True raises on any graph break
        out = torch.compile(model, fullgraph=True, backend=backend)(images, mask)
    assert backend.graphs == 1
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-5)


def test_lwdetr_dynamic_shapes_trace_once_for_every_size() -> None:
    """``torch.compile(dynamic=True)``: one graph serves several input sizes (the per-level shapes of the deformable
    attention stay symbolic; reading them as Python ints would specialise the graph and recompile per size)."""
    torch._dynamo.reset()
    model = _model("lwdetr_tiny_coco.yaml", LWDETR_SMALL + SHALLOW)
    backend = _CountGraphs()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=backend)
    with torch.no_grad():
        for size in ((128, 192), (192, 128)):
            images, mask = _inputs(*size, padded=True)
            out, ref = compiled(images, mask), model(images, mask)
            for key in ("pred_logits", "pred_boxes"):
                torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-5)
    assert backend.graphs == 1


@pytest.mark.slow
def test_inductor_compiled_lwdetr_matches_eager() -> None:
    torch._dynamo.reset()
    model = _model("lwdetr_tiny_coco.yaml", LWDETR_SMALL + SHALLOW, optimized=True)
    images, mask = _inputs(128, 128, padded=False)
    with torch.no_grad():
        ref = model(images, mask)
        out = torch.compile(model, fullgraph=True)(images, mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-4)
