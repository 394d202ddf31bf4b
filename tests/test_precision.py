"""Precision as GPU users expect: the TF32 switch, and geometry in float32 under bf16 autocast (on the CPU).

Under autocast the linear layers return bf16; the tests check that the coordinates do not follow them: the grid handed
to ``grid_sample``, the sampling locations' references, the two-stage proposals, the valid ratios, the predicted
boxes of DETR and LW-DETR (small configurations of the shipped recipes), the matcher's inputs and costs, the losses
and the post-processed boxes. Each model test also checks that the heavy layers did run in bf16 (else it would prove
nothing).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from detkit import build_model, compose
from detkit.engine.precision import configure_tf32, tf32_enabled
from detkit.models.losses.ia_bce import LWDETRCriterion
from detkit.models.losses.set_criterion import SetCriterion
from detkit.models.matchers.hungarian import HungarianMatcher
from detkit.models.transformers import lwdetr as lwdetr_transformer
from detkit.ops.ms_deform_attn import MSDeformAttn, ms_deform_attn
from detkit.ops.precision import at_least_float32, geometry_dtype
from tests.conftest import CONFIGS

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.engine import tiny_config  # noqa: E402
from support.tiny_detector import TinyShapes  # noqa: E402

BF16 = torch.bfloat16
#: DETR with a ResNet-18, one encoder and two decoder layers, narrow FFN, no dropout
DETR_SMALL = ["model.num_classes=5", "model.num_queries=10", "model.hidden_dim=32", "model.backbone.depth=18",
              "model.transformer.nhead=4", "model.transformer.num_encoder_layers=1",
              "model.transformer.num_decoder_layers=2", "model.transformer.dim_feedforward=64",
              "model.transformer.dropout=0.0"]
#: LW-DETR tiny (one level, P4) and large (two levels, P3 + P5) with a small ViT and few queries
LWDETR_SMALL = ["model.num_classes=5", "model.hidden_dim=32", "model.num_queries=12", "model.group_detr=2",
                "model.backbone.embed_dim=32", "model.backbone.depth=2", "model.backbone.num_heads=2",
                "model.backbone.window_blocks=[0]", "model.backbone.out_indices=[0,1]",
                "model.transformer.num_layers=2", "model.transformer.sa_heads=2", "model.transformer.ca_heads=2",
                "model.transformer.dim_feedforward=64"]
MODELS = {
    "detr": ("detr_r50.yaml", DETR_SMALL),
    "lwdetr_tiny": ("lwdetr_tiny.yaml", LWDETR_SMALL),
    "lwdetr_large": ("lwdetr_large.yaml", [*LWDETR_SMALL, "model.neck.num_blocks=1"]),
}


def autocast_bf16() -> torch.autocast:
    return torch.autocast("cpu", dtype=BF16)


@pytest.fixture
def tf32_flags() -> Iterator[None]:
    """Restore the process-wide TF32 flags after the test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def grid_sample_dtypes(monkeypatch) -> list[tuple[torch.dtype, torch.dtype]]:
    """``(input dtype, grid dtype)`` of every ``F.grid_sample`` call during the test."""
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    original = F.grid_sample

    def spy(input: torch.Tensor, grid: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append((input.dtype, grid.dtype))
        return original(input, grid, *args, **kwargs)

    monkeypatch.setattr(F, "grid_sample", spy)
    return seen


def batch() -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Two 128x128 images, the second padded on the right (so the valid ratios are not all 1), and targets."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 128, 128, generator=gen)
    mask = torch.zeros(2, 128, 128, dtype=torch.bool)
    mask[1, :, 96:] = True
    images[1, :, :, 96:] = 0
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.6, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    return images, mask, targets


def small_model(name: str, official_init: bool = False) -> torch.nn.Module:
    config, overrides = MODELS[name]
    torch.manual_seed(0)
    model = build_model(compose(CONFIGS / "_base_/models" / config, overrides).model)
    if name.startswith("lwdetr") and not official_init:
        # the official init zeroes the last box layers (every box is then a proposal); give them some regression
        with torch.no_grad():
            for head in (model.bbox_embed, *model.transformer.enc_out_bbox_embed):
                head.layers[-1].weight.normal_(0, 0.05)
    return model


def all_pred_boxes(out: dict[str, Any]) -> list[torch.Tensor]:
    """``pred_boxes`` of the final, auxiliary and two-stage outputs."""
    outs = [out, *out.get("aux_outputs", [])] + ([out["enc_outputs"]] if "enc_outputs" in out else [])
    return [o["pred_boxes"] for o in outs]


# ---------------------------------------------------------------------------------------------------------------------
# TF32
# ---------------------------------------------------------------------------------------------------------------------
def test_configure_tf32_sets_the_cuda_matmul_and_cudnn_flags(tf32_flags) -> None:
    configure_tf32(False)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32 and not tf32_enabled()
    configure_tf32(True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 and tf32_enabled()


@pytest.mark.parametrize("setting, expected", [([], True), (["runtime.tf32=false"], False)])
def test_trainer_applies_runtime_tf32(tmp_path, tf32_flags, setting, expected) -> None:
    from detkit.engine.trainer import Trainer

    configure_tf32(not expected)
    trainer = Trainer(tiny_config(tmp_path, setting, epochs=1, max_steps=1, eval_interval=-1),
                      datasets=(TinyShapes(4), TinyShapes(2, seed=1, flip=False)))
    trainer.fit()
    assert torch.backends.cuda.matmul.allow_tf32 is expected and torch.backends.cudnn.allow_tf32 is expected


class _Applied(Exception):
    """Raised by the stand-in of ``configure_tf32``: the tool got as far as applying the setting."""


@pytest.mark.parametrize("off", [False, True], ids=["default", "off"])
@pytest.mark.parametrize("tool", ["eval", "predict", "bench"])
def test_tools_apply_the_tf32_setting(tool, off, tmp_path, monkeypatch) -> None:
    from support.tools import tiny_lwdetr_config

    from detkit.bench import bench_main
    from detkit.engine import precision
    from detkit.engine.eval_cli import eval_main
    from detkit.predict import predict_main

    calls: list[bool] = []

    def record(enabled: bool) -> None:
        calls.append(enabled)
        raise _Applied

    monkeypatch.setattr(precision, "configure_tf32", record)
    cfg, ckpt = tiny_lwdetr_config(tmp_path), tmp_path / "model.pth"
    ckpt.write_bytes(b"")  # never read: the setting is applied before the checkpoint is loaded
    setting = ["runtime.tf32=false"] if off else []
    runs = {"eval": (eval_main, [str(cfg), *setting, "--checkpoint", str(ckpt)]),
            "bench": (bench_main, [str(cfg), *setting]),
            "predict": (predict_main, [str(tmp_path), "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"),
                                       *(["--no-tf32"] if off else [])])}
    main, argv = runs[tool]
    with pytest.raises(_Applied):
        main(argv)
    assert calls == [not off]


# ---------------------------------------------------------------------------------------------------------------------
# deformable attention
# ---------------------------------------------------------------------------------------------------------------------
def test_geometry_dtype_is_at_least_float32() -> None:
    assert geometry_dtype(torch.zeros(1, dtype=BF16)) is torch.float32
    assert geometry_dtype(torch.zeros(1, dtype=torch.float16), torch.zeros(1)) is torch.float32
    assert geometry_dtype(torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=BF16)) is torch.float64
    x = torch.zeros(2)
    assert at_least_float32(x) is x and at_least_float32(x.to(BF16)).dtype is torch.float32


def test_ms_deform_attn_samples_bf16_values_at_float32_locations(grid_sample_dtypes) -> None:
    torch.manual_seed(0)
    shapes = [(6, 10), (3, 5)]
    value = torch.randn(2, 75, 2, 4).to(BF16)
    # locations that bf16 cannot hold: 0.7 + 1e-3 rounds to 0.69921875 in bf16 (a shift of 0.05 pixel at w=10)
    locs = torch.rand(2, 3, 2, 2, 2, 2) * 0.6 + 0.2 + 1e-3
    weights = torch.rand(2, 3, 2, 2, 2).to(BF16)
    out = ms_deform_attn(value, shapes, locs, weights)
    assert grid_sample_dtypes == [(torch.float32, torch.float32)] * 2
    assert out.dtype == BF16
    # the same as sampling the (exact) float32 copy of the bf16 values at the float32 locations
    expected = ms_deform_attn(value.float(), shapes, locs, weights.float()).to(BF16)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_ms_deform_attn_module_under_autocast_keeps_locations_float32(grid_sample_dtypes) -> None:
    torch.manual_seed(0)
    attn = MSDeformAttn(32, 2, 4, 2)
    shapes = [(6, 6), (3, 3)]
    query, value = torch.randn(2, 5, 32), torch.randn(2, 45, 32)
    ref = torch.rand(2, 5, 2, 4) * 0.5 + 0.25
    with autocast_bf16():
        out = attn(query, ref, value, shapes)
    assert out.dtype == BF16  # the projections ran in bf16
    assert grid_sample_dtypes == [(torch.float32, torch.float32)] * 2


# ---------------------------------------------------------------------------------------------------------------------
# the detectors
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lwdetr_tiny", "lwdetr_large"])
def test_lwdetr_geometry_stays_float32_under_bf16_autocast(name, grid_sample_dtypes, monkeypatch) -> None:
    model = small_model(name).train()
    images, mask, _ = batch()
    seen: dict[str, list[torch.dtype]] = {"proposals": [], "valid_ratios": [], "refpoints": [], "references": [],
                                          "attention": []}
    original = lwdetr_transformer.gen_encoder_output_proposals

    def proposals_spy(*args: Any) -> Any:
        result = original(*args)
        seen["proposals"].append(result[1].dtype)
        return result

    monkeypatch.setattr(lwdetr_transformer, "gen_encoder_output_proposals", proposals_spy)
    decoder = model.transformer.decoder

    def decoder_inputs(module: Any, args: tuple[Any, ...]) -> None:  # (tgt, memory, refpoints, shapes, ratios, ...)
        seen["refpoints"].append(args[2].dtype)
        seen["valid_ratios"].append(args[4].dtype)

    handles = [decoder.register_forward_pre_hook(decoder_inputs)]
    for layer in decoder.layers:
        handles.append(layer.cross_attn.register_forward_pre_hook(
            lambda m, args: seen["references"].append(args[1].dtype)))
        handles.append(layer.cross_attn.register_forward_hook(lambda m, a, y: seen["attention"].append(y.dtype)))
    try:
        with autocast_bf16():
            out = model(images, mask)
    finally:
        for h in handles:
            h.remove()

    # the attention projections and the heads ran in bf16
    assert seen["attention"] == [BF16] * len(decoder.layers) and out["pred_logits"].dtype == BF16
    assert seen["proposals"] == seen["valid_ratios"] == seen["refpoints"] == [torch.float32]
    assert seen["references"] == [torch.float32] * len(decoder.layers)
    assert grid_sample_dtypes and all(d == (torch.float32, torch.float32) for d in grid_sample_dtypes)
    boxes = all_pred_boxes(out)
    assert len(boxes) == 3 and all(b.dtype == torch.float32 for b in boxes)
    # composed in float32, not bf16 values cast up afterwards
    assert all((b != b.to(BF16).float()).any() for b in boxes)


def test_detr_boxes_are_float32_under_bf16_autocast() -> None:
    model = small_model("detr").train()
    images, mask, _ = batch()
    with autocast_bf16():
        out = model(images, mask)
    assert out["pred_logits"].dtype == BF16
    boxes = all_pred_boxes(out)
    assert len(boxes) == 2 and all(b.dtype == torch.float32 for b in boxes)
    assert all((b != b.to(BF16).float()).any() for b in boxes)


@pytest.mark.parametrize("name", ["detr", "lwdetr_tiny"])
def test_postprocessed_boxes_are_float32_under_bf16_autocast(name) -> None:
    model = small_model(name).eval()
    images, mask, _ = batch()
    sizes = torch.tensor([[480, 640], [300, 400]])
    with torch.no_grad(), autocast_bf16():
        out = model(images, mask)
        results = model.postprocessor(out, sizes)
    assert all(r["boxes"].dtype == torch.float32 and r["scores"].dtype == torch.float32 for r in results)
    # normalised box coordinates are float32 values: not all of them are bf16 numbers
    normalised = torch.cat([r["boxes"] / torch.tensor([w, h, w, h]) for r, (h, w) in zip(results, sizes.tolist())])
    assert (normalised != normalised.to(BF16).float()).any()


def test_evaluation_decodes_float32_boxes_under_bf16_autocast(tmp_path) -> None:
    from support.tools import tiny_lwdetr_config

    from detkit.config import to_container
    from detkit.data.build import build_datasets
    from detkit.engine.evaluator import predict_dataset

    _, val = build_datasets(to_container(compose(tiny_lwdetr_config(tmp_path)).data), train=False)
    # official init: zero box deltas, so every predicted box is a proposal of the single level, 0.05 wide and high;
    # bf16 proposals would be 0.050048828125 (0.0094 px more at 192 px, visible in the 3 decimals of the results)
    model = small_model("lwdetr_tiny", official_init=True)
    produced: list[torch.dtype] = []
    model.register_forward_hook(lambda m, args, out: produced.append(out["pred_boxes"].dtype))
    detections = predict_dataset(model, val, batch_size=2, amp_dtype=BF16)
    assert produced == [torch.float32] * 2 and detections
    images = val.coco_gt().imgs
    for d in detections:
        size = images[d["image_id"]]
        assert d["bbox"][2:] == pytest.approx([0.05 * size["width"], 0.05 * size["height"]], abs=1.5e-3), d


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_training_step_matches_in_float32_and_gives_finite_losses(name, monkeypatch) -> None:
    """The criterion called straight on the autocast outputs (no trainer cast): the matcher gets float32 boxes and
    computes float32 costs, every loss is float32 and finite, and the backward gives finite gradients."""
    model = small_model(name).train()
    images, mask, targets = batch()
    matcher_boxes: list[torch.dtype] = []
    costs: list[torch.dtype] = []
    matcher = model.criterion.matcher
    original_cost = matcher.cost_matrix
    monkeypatch.setattr(matcher, "cost_matrix", lambda o, t: (costs.append((c := original_cost(o, t)).dtype), c)[1])
    handle = matcher.register_forward_pre_hook(lambda m, args: matcher_boxes.append(args[0]["pred_boxes"].dtype))
    try:
        with autocast_bf16():
            out = model(images, mask)
            losses = model.criterion(out, targets)
    finally:
        handle.remove()
    calls = 1 + len(out.get("aux_outputs", [])) + ("enc_outputs" in out)
    assert matcher_boxes == costs == [torch.float32] * calls
    loss_terms = {k: v for k, v in losses.items() if k.startswith("loss")}
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in loss_terms.values()), loss_terms
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------------------------------
# the losses and the matcher called directly on low-precision outputs
# ---------------------------------------------------------------------------------------------------------------------
def _outputs(num_classes: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    boxes = torch.rand(2, 6, 4, generator=gen) * 0.4 + 0.2
    return {"pred_logits": torch.randn(2, 6, num_classes, generator=gen), "pred_boxes": boxes}


@pytest.mark.parametrize("kind", ["ia_bce", "set_criterion"])
def test_criteria_compute_bf16_outputs_in_float32(kind) -> None:
    gen = torch.Generator().manual_seed(0)
    _, _, targets = batch()
    if kind == "ia_bce":
        matcher = HungarianMatcher(2, 5, 2, class_cost="focal")
        criterion, num_logits = LWDETRCriterion(matcher, num_classes=5, group_detr=1), 5
    else:
        criterion, num_logits = SetCriterion(5, HungarianMatcher()), 6
    outputs = {k: v.to(BF16) for k, v in _outputs(num_logits, gen).items()}
    outputs["aux_outputs"] = [{k: v.to(BF16) for k, v in _outputs(num_logits, gen).items()}]
    low = criterion(outputs, targets)
    cast = criterion({"aux_outputs": [{k: v.float() for k, v in outputs["aux_outputs"][0].items()}],
                      **{k: outputs[k].float() for k in ("pred_logits", "pred_boxes")}}, targets)
    for key, value in cast.items():
        assert low[key].dtype == torch.float32, key
        torch.testing.assert_close(low[key], value, atol=0, rtol=0, msg=key)


def test_matcher_costs_are_float32_for_bf16_inputs_under_autocast() -> None:
    gen = torch.Generator().manual_seed(1)
    _, _, targets = batch()
    outputs = {k: v.to(BF16) for k, v in _outputs(5, gen).items()}
    for cost in ("focal", "softmax"):
        with autocast_bf16():
            matrix = HungarianMatcher(class_cost=cost).cost_matrix(outputs, targets)
        assert matrix.dtype == torch.float32
        expected = HungarianMatcher(class_cost=cost).cost_matrix({k: v.float() for k, v in outputs.items()}, targets)
        torch.testing.assert_close(matrix, expected, atol=0, rtol=0)
