"""Official Atten4Vis/LW-DETR state dicts <-> detkit LW-DETR state dicts.

The layouts differ only by two prefixes: the official ``backbone.0.encoder.`` (ViT) is detkit's ``backbone.`` and
``backbone.0.projector.`` is ``neck.``; every other key (``transformer.*``, ``class_embed``, ``bbox_embed``,
``refpoint_embed``, ``query_feat``) is the same. Regular and EMA checkpoints (``checkpoint_best_ema.pth``) both store
their weights under ``model``; pass that state dict (a whole checkpoint dict with a ``model`` entry is accepted too).

``inference_only=True`` drops the training-only Group-DETR parts: the two-stage heads of groups 1..G-1 and all but
the first ``num_queries`` rows of ``refpoint_embed`` / ``query_feat``. The result loads into a model built with
``group_detr: 1``. With ``inference_only=None`` (the default) this happens when ``model_cfg`` asks for
``group_detr: 1`` and the checkpoint has more groups.

Both directions check the state dict's own consistency (known keys only; the same groups in every two-stage head;
query rows a multiple of the groups) and, when ``model_cfg`` is given, every key and shape against the model it
builds (on the meta device); any mismatch is a :class:`~detkit.errors.CheckpointError` naming the keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

import torch.nn as nn

from detkit.errors import CheckpointError
from detkit.registry import CHECKPOINT_FORMATS, DETECTORS
from detkit.weights.formats.base import CheckpointFormat
from detkit.weights.formats.prefixes import rename_prefixes, shorten
from detkit.weights.keys import split_loader_keys
from detkit.weights.report import WeightsReport

__all__ = [
    "LWDETRFormat",
    "official_to_detkit",
    "detkit_to_official",
    "looks_official",
    "looks_detkit",
    "to_inference",
    "num_groups",
    "PREFIXES",
]

#: (official prefix, detkit prefix); the first match wins
PREFIXES: tuple[tuple[str, str], ...] = (
    ("backbone.0.encoder.", "backbone."),
    ("backbone.0.projector.", "neck."),
    ("transformer.", "transformer."),
    ("class_embed.", "class_embed."),
    ("bbox_embed.", "bbox_embed."),
    ("refpoint_embed.", "refpoint_embed."),
    ("query_feat.", "query_feat."),
)

_GROUP_HEADS = ("enc_output", "enc_output_norm", "enc_out_bbox_embed", "enc_out_class_embed")
_GROUP_KEY = re.compile(r"^transformer\.(" + "|".join(_GROUP_HEADS) + r")\.(\d+)\.")


def _unwrap(state: Mapping[str, Any]) -> Mapping[str, Any]:
    inner = state.get("model") if isinstance(state, Mapping) else None
    return inner if isinstance(inner, Mapping) else state


def num_groups(state: Mapping[str, Any]) -> int:
    """Number of Group-DETR groups in a (detkit or official) LW-DETR state dict, checked for consistency."""
    found: dict[str, set[int]] = {h: set() for h in _GROUP_HEADS}
    for key in state:
        m = _GROUP_KEY.match(key)
        if m:
            found[m.group(1)].add(int(m.group(2)))
    counts = {h: len(g) for h, g in found.items()}
    groups = counts["enc_output"]
    bad = [f"{h}: groups {sorted(g)}" for h, g in found.items() if g != set(range(groups))]
    if bad or groups == 0:
        raise CheckpointError(
            "inconsistent two-stage heads (every one needs groups 0..G-1, G >= 1): " + "; ".join(bad or [str(counts)])
        )
    return groups


def _check_queries(state: Mapping[str, Any], groups: int) -> int:
    """Queries per group, after checking ``refpoint_embed`` / ``query_feat`` agree with ``groups``."""
    for key in ("refpoint_embed.weight", "query_feat.weight"):
        if key not in state:
            raise CheckpointError(f"the LW-DETR state dict has no {key!r}")
    rows_r, rows_q = state["refpoint_embed.weight"].shape[0], state["query_feat.weight"].shape[0]
    if rows_r != rows_q or rows_r % groups:
        raise CheckpointError(
            f"refpoint_embed.weight has {rows_r} rows and query_feat.weight {rows_q}; both must equal "
            f"num_queries x {groups} groups"
        )
    return rows_r // groups


def to_inference(state: Mapping[str, Any], groups: int = 1) -> dict[str, Tensor]:
    """Keep the first ``groups`` query groups (default: group 0 only) of a detkit or official state dict."""
    total = num_groups(state)
    nq = _check_queries(state, total)
    if not 1 <= groups <= total:
        raise CheckpointError(f"cannot keep {groups} groups of a checkpoint with {total}")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = _GROUP_KEY.match(key)
        if m and int(m.group(2)) >= groups:
            continue
        if key in ("refpoint_embed.weight", "query_feat.weight"):
            value = value[: nq * groups].clone()
        out[key] = value
    return out


def _wanted_groups(state: Mapping[str, Any], inference_only: bool | None, model_cfg: Mapping[str, Any] | None) -> int:
    have = num_groups(state)
    _check_queries(state, have)
    if inference_only:
        return 1
    if inference_only is None and model_cfg and "group_detr" in model_cfg:
        want = int(model_cfg["group_detr"])
        if want < have:
            return want
    return have


def _official_name(key: str) -> str:
    for src, dst in PREFIXES:
        if key.startswith(dst):
            return src + key[len(dst) :]
    return key


def _check_against_model(state: Mapping[str, Tensor], model_cfg: Mapping[str, Any], official_names: bool) -> None:
    """Every key and shape of ``state`` (detkit layout) against the model ``model_cfg`` builds; errors name the keys
    in the official layout when ``official_names``. The model is built through the DETECTORS registry (as
    :func:`detkit.models.build.build_model` does), on the meta device."""
    with torch.device("meta"):
        own = DETECTORS.build(split_loader_keys(model_cfg)[0]).state_dict()
    name = _official_name if official_names else (lambda k: k)
    missing = [name(k) for k in own if k not in state]
    unexpected = [name(k) for k in state if k not in own]
    reshaped = [
        f"{name(k)} {tuple(state[k].shape)} (model {tuple(own[k].shape)})"
        for k in state
        if k in own and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or reshaped:
        layout = "official" if official_names else "detkit"
        lines = [f"the LW-DETR state dict ({layout} key names) does not fit the configured model:"]
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", reshaped)):
            if keys:
                lines.append(f"  {name} ({len(keys)}): {shorten(keys)}")
        raise CheckpointError("\n".join(lines))


def official_to_detkit(
    state: Mapping[str, Any],
    inference_only: bool | None = None,
    model_cfg: Mapping[str, Any] | None = None,
    **opts: Any,
) -> dict[str, Tensor]:
    """Official LW-DETR ``model`` state dict -> detkit state dict (keys renamed, tensors shared).

    :param inference_only: keep only group 0 (see the module docstring); ``None`` follows ``model_cfg``.
    :param model_cfg: the detkit ``model:`` section; when given, keys and shapes are checked against it.
    """
    state = _unwrap(state)
    groups = _wanted_groups(state, inference_only, model_cfg)
    out = rename_prefixes(state, PREFIXES, "an official LW-DETR")
    if groups != num_groups(out):
        out = to_inference(out, groups)
    if model_cfg:
        _check_against_model(out, model_cfg, official_names=True)
    return out


def detkit_to_official(
    state: Mapping[str, Any],
    inference_only: bool | None = None,
    model_cfg: Mapping[str, Any] | None = None,
    **opts: Any,
) -> dict[str, Tensor]:
    """detkit LW-DETR state dict -> official ``model`` state dict (inverse of :func:`official_to_detkit`).

    :param inference_only: keep only group 0 (the official code then needs ``--group_detr 1``).
    :param model_cfg: the detkit ``model:`` section the state dict came from; when given, keys and shapes are
        checked against it before converting.
    """
    state = _unwrap(state)
    if model_cfg:
        _check_against_model(state, model_cfg, official_names=False)
    num_groups(state)
    inner = {k: v for k, v in state.items()}
    if inference_only:
        inner = to_inference(inner, 1)
    return rename_prefixes(inner, tuple((d, s) for s, d in PREFIXES), "a detkit LW-DETR")


def looks_official(state: Mapping[str, Any]) -> bool:
    """True for an official LW-DETR state dict (a ViT under ``backbone.0.encoder`` and LW-DETR's query tables)."""
    state = _unwrap(state)
    return "backbone.0.encoder.pos_embed" in state and "refpoint_embed.weight" in state and "query_feat.weight" in state


def looks_detkit(state: Mapping[str, Any]) -> bool:
    """True for a detkit LW-DETR state dict."""
    state = _unwrap(state)
    return "backbone.pos_embed" in state and "refpoint_embed.weight" in state and "query_feat.weight" in state


def adapt_groups(model: nn.Module, state: dict[str, Tensor], report: WeightsReport) -> dict[str, Tensor]:
    """Fit a detkit-layout ``state``'s Group-DETR groups to ``model``'s (drop extra groups; repeat group 0..G-1 when
    the model trains with more groups than an inference-only file has). Other files are returned unchanged."""
    groups = getattr(model, "group_detr", None)
    queries = getattr(model, "num_queries", None)
    if not groups or not queries or "refpoint_embed.weight" not in state:
        return state
    try:
        have = num_groups(state)
    except CheckpointError:
        return state
    rows = state["refpoint_embed.weight"].shape[0]
    if have == groups or rows != have * queries or state.get("query_feat.weight", state["refpoint_embed.weight"]
                                                             ).shape[0] != rows:
        return state  # same groups, or other queries: the generic path reports it
    out = dict(state)
    for key in ("refpoint_embed.weight", "query_feat.weight"):
        value = state[key]
        if groups < have:
            out[key] = value[: groups * queries].clone()
        else:
            out[key] = torch.cat([value[(g % have) * queries:(g % have + 1) * queries] for g in range(groups)])
        report.notes[key] = f"{have}->{groups} groups"
    pattern = re.compile(r"^(transformer\.(?:enc_output|enc_output_norm|enc_out_bbox_embed|enc_out_class_embed))"
                         r"\.(\d+)\.(.+)$")
    for key in list(state):
        m = pattern.match(key)
        if m and groups > have and int(m.group(2)) < have:
            for g in range(have, groups):
                if g % have == int(m.group(2)):
                    new = f"{m.group(1)}.{g}.{m.group(3)}"
                    out[new] = state[key]
                    report.notes[new] = f"copy of group {g % have}"
    return out


@CHECKPOINT_FORMATS.register("lwdetr")
class LWDETRFormat(CheckpointFormat):
    """Atten4Vis/LW-DETR checkpoints (``LWDETR_tiny_60e_coco.pth``, ...): two prefixes, and Group-DETR groups."""

    label = "official LW-DETR"
    extra_class_rows = 0

    def looks_official(self, state: Mapping[str, Any]) -> bool:
        return looks_official(state)

    def looks_detkit(self, state: Mapping[str, Any]) -> bool:
        return looks_detkit(state)

    def to_detkit(self, state: Mapping[str, Any], model_cfg: Mapping[str, Any] | None = None,
                  inference_only: bool | None = None) -> dict[str, Tensor]:
        return official_to_detkit(state, inference_only=inference_only, model_cfg=model_cfg)

    def to_official(self, state: Mapping[str, Any], model_cfg: Mapping[str, Any] | None = None,
                    inference_only: bool | None = None) -> dict[str, Tensor]:
        return detkit_to_official(state, inference_only=inference_only, model_cfg=model_cfg)

    def adapt_groups(self, model: nn.Module, state: dict[str, Tensor], report: WeightsReport) -> dict[str, Tensor]:
        return adapt_groups(model, state, report)
