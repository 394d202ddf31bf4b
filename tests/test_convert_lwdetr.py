"""Official LW-DETR checkpoints <-> detkit, built from the reference shape files (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detkit.config import compose, to_container
from detkit.weights.formats import lwdetr as conv
from detkit.errors import CheckpointError
from detkit.models.build import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIZES = ("tiny", "small", "medium", "large", "xlarge")


def shapes(size: str) -> dict[str, list[int]]:
    shared = Path(__file__).resolve().parents[2] / "shared"
    if not shared.is_dir():
        shared = Path("/work/shared")
    ref = json.loads((shared / f"reference/state_dicts/lwdetr_{size}.json").read_text())
    ref.pop("__num_params__")
    return ref


def synthetic_official(size: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """An official-layout state dict with random values (meta tensors when only shapes matter)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for key, shape in shapes(size).items():
        if device == "meta":
            dtype = torch.int64 if key.endswith("num_batches_tracked") else torch.float32
            out[key] = torch.empty(shape, dtype=dtype, device="meta")
        elif key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith(("norm1.weight", "norm2.weight", "norm3.weight", "norm.weight", "bn.weight")) or (
            "enc_output_norm" in key and key.endswith("weight")
        ) or (key.startswith("backbone.0.projector.stages.") and key.endswith(".1.weight")):
            out[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[key] = 0.05 * torch.randn(shape, generator=g)  # also perturbs the zero-initialised heads
    return out


def model_cfg(size: str, *overrides: str) -> dict:
    return to_container(compose(CONFIGS / f"lwdetr_{size}_coco.yaml", list(overrides)).model)


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_keys_and_shapes(size):
    official = synthetic_official(size, device="meta")
    assert conv.looks_official(official) and not conv.looks_detkit(official)
    cfg = model_cfg(size)
    ours = conv.official_to_detkit(official, model_cfg=cfg)  # checks every key and shape against the model
    assert conv.looks_detkit(ours) and not conv.looks_official(ours)
    with torch.device("meta"):
        model = build_model(cfg)
    assert [(k, v.shape) for k, v in ours.items()] == [(k, v.shape) for k, v in model.state_dict().items()]
    back = conv.detkit_to_official(ours, model_cfg=cfg)
    assert list(back) == list(official) and all(back[k] is official[k] for k in official)
    # the inference model: group 0 and the first Q rows, = a group_detr 1 model
    inf = conv.official_to_detkit(official, model_cfg=model_cfg(size, "model.group_detr=1"))
    with torch.device("meta"):
        single = build_model(model_cfg(size, "model.group_detr=1"))
    assert {k: v.shape for k, v in inf.items()} == {k: v.shape for k, v in single.state_dict().items()}


def test_tiny_load_forward_round_trip_and_inference_only():
    torch.manual_seed(0)
    official = synthetic_official("tiny")
    ours = conv.official_to_detkit({"model": official})  # a whole checkpoint dict works too
    model = build_model(model_cfg("tiny"))
    model.load_state_dict(ours, strict=True)
    model.eval()
    x = torch.randn(1, 3, 256, 256)
    mask = torch.zeros(1, 256, 256, dtype=torch.bool)
    with torch.no_grad():
        out = model(x, mask)
    back = conv.detkit_to_official(model.state_dict())
    assert list(back) == list(official)
    for k, v in official.items():
        assert torch.equal(back[k], v), k

    # the converter's inference model (group 0) gives the same predictions as the full model in eval mode
    inf = conv.official_to_detkit(official, inference_only=True)
    assert inf["refpoint_embed.weight"].shape == (100, 4) and "transformer.enc_output.1.weight" not in inf
    single = build_model(model_cfg("tiny", "model.group_detr=1"))
    single.load_state_dict(inf, strict=True)
    single.eval()
    with torch.no_grad():
        out1 = single(x, mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(out1[key], out[key])
    # had the converter kept another group's heads, the two-stage outputs would differ
    assert not torch.equal(official["transformer.enc_out_class_embed.0.weight"],
                           official["transformer.enc_out_class_embed.1.weight"])
    # detkit -> official inference-only keeps 1 group too
    back1 = conv.detkit_to_official(ours, inference_only=True)
    assert conv.num_groups(back1) == 1 and back1["query_feat.weight"].shape == (100, 256)


def test_mismatches_are_refused_by_name():
    official = synthetic_official("tiny", device="meta")
    bad = dict(official)
    bad["backbone.0.encoder.extra_token"] = torch.empty(3, device="meta")
    with pytest.raises(CheckpointError, match="backbone.0.encoder.extra_token"):
        conv.official_to_detkit(bad, model_cfg=model_cfg("tiny"))
    with pytest.raises(CheckpointError, match="do not belong.*something.else"):
        conv.official_to_detkit({**official, "something.else": torch.empty(1, device="meta")})
    # a small-size checkpoint against the tiny config: shapes and keys differ, named
    with pytest.raises(CheckpointError, match="query_feat.weight \\(3900, 256\\)"):
        conv.official_to_detkit(synthetic_official("small", device="meta"), model_cfg=model_cfg("tiny"))
    # a missing group in one two-stage head
    broken = {k: v for k, v in official.items() if not k.startswith("transformer.enc_out_class_embed.5.")}
    with pytest.raises(CheckpointError, match="enc_out_class_embed"):
        conv.official_to_detkit(broken)
    # query rows not matching the groups
    rows = dict(official)
    rows["query_feat.weight"] = torch.empty(1299, 256, device="meta")
    with pytest.raises(CheckpointError, match="query_feat.weight 1299; both must equal num_queries x 13 groups"):
        conv.official_to_detkit(rows)
