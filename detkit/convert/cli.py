"""``detkit convert`` / ``tools/convert_checkpoint.py``: official checkpoints <-> detkit checkpoints.

Official -> detkit (default)::

    python tools/convert_checkpoint.py detr-r50-e632da11.pth --format auto --config configs/detr_r50.yaml \
        --out detr_r50_detkit.pth [model.num_queries=100 ...]

reads ``ckpt["model"]`` (or a bare state dict), renames the keys with the format's converter, checks every key and
shape against the model that ``--config`` builds (on the meta device, so nothing is allocated) and writes a detkit
checkpoint ``{model, config, classes, plugins, detkit_version}``. ``--to official`` goes back: a detkit checkpoint ->
``{"model": official_state_dict}``.

A format is an entry of :data:`~detkit.registry.CHECKPOINT_FORMATS` named after the model type it converts (a
:class:`~detkit.weights.formats.CheckpointFormat`: ``looks_official``, ``to_detkit``, ``to_official``; see
:mod:`detkit.weights.formats`), so a plugin detector brings its own; ``model_cfg`` is the resolved ``model:``
section as a plain dict, or ``None`` when unknown.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detkit.data.classes import COCO_OFFICIAL_CLASSES
from detkit.errors import CheckpointError, ConfigError, DetkitError
from detkit.registry import CHECKPOINT_FORMATS
from detkit.weights.formats import detect_official, find_detkit, get_format
from detkit.weights.io import load_checkpoint_file, save_checkpoint
from detkit.weights.state import pick_state

if TYPE_CHECKING:
    import torch

__all__ = ["main", "convert_to_detkit", "convert_to_official", "class_names"]


def class_names(label_map: str, num_classes: int) -> list[str]:
    """Class names stored with a converted checkpoint: the COCO layout for ``coco_official`` with 91 slots,
    otherwise placeholders ``class_<i>`` (the official checkpoint carries no names)."""
    if label_map == "coco_official" and num_classes == len(COCO_OFFICIAL_CLASSES):
        return list(COCO_OFFICIAL_CLASSES)
    return [f"class_{i}" for i in range(num_classes)]


def _read(path: Path, trust_pickle: bool) -> dict[str, Any]:
    import torch

    if not trust_pickle:
        return load_checkpoint_file(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    warnings.warn(f"--trust-pickle: loading {path} with full unpickling (weights_only=False); only do this for files "
                  "you trust", stacklevel=2)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def _state_dict_of(ckpt: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """``ckpt["model"]``, or the dict itself when it is a bare state dict (:func:`detkit.weights.state.pick_state`)."""
    return pick_state(ckpt, False, path, model_entries=("model",))[0]


def _check_fits(state: Mapping[str, torch.Tensor], model: torch.nn.Module, config: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {tuple(state[k].shape)} (config expects {tuple(own[k].shape)})"
                for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or reshaped):
        return
    lines = [f"the checkpoint does not fit the model built from {config}:"]
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", reshaped)):
        if keys:
            lines.append(f"  {name} ({len(keys)}): " + ", ".join(keys[:10]) + (" ..." if len(keys) > 10 else ""))
    lines.append("Pick the config of the same variant (e.g. R50 vs R101, LW-DETR size) or override num_classes / "
                 "num_queries to match the checkpoint.")
    raise CheckpointError("\n".join(lines))


def convert_to_detkit(src: str | Path, out: str | Path, config: str | Path, overrides: Sequence[str] = (),
                      fmt: str = "auto", trust_pickle: bool = False) -> dict[str, Any]:
    """Official checkpoint ``src`` -> detkit checkpoint ``out``; returns the written dict."""
    import torch

    import detkit
    from detkit.config import compose, to_container
    from detkit.models.build import build_model

    src = Path(src)
    state = _state_dict_of(_read(src, trust_pickle), src)
    fmt = detect_official(state, src) if fmt == "auto" else fmt
    module = get_format(fmt)
    if not module.looks_official(state):
        raise CheckpointError(f"{src} does not look like an official {fmt} checkpoint (expected keys are missing)")
    cfg = compose(config, overrides)
    model_cfg = to_container(cfg.model)
    if model_cfg.get("type") != fmt:
        raise ConfigError(f"{config} builds a {model_cfg.get('type')!r} model, but the checkpoint is {fmt!r}")
    converted = module.to_detkit(state, model_cfg=model_cfg)
    with torch.device("meta"):
        model = build_model(cfg.model)
    _check_fits(converted, model, str(config))
    from detkit import plugins

    ckpt = {
        "model": converted,
        "config": to_container(cfg),
        "classes": class_names(cfg.data.label_map, int(model.num_classes)),
        "plugins": plugins.loaded_plugins(),
        "detkit_version": detkit.__version__,
    }
    save_checkpoint(ckpt, out)
    return ckpt


def convert_to_official(src: str | Path, out: str | Path, fmt: str = "auto") -> dict[str, Any]:
    """detkit checkpoint ``src`` -> ``{"model": official_state_dict}`` at ``out``; returns the written dict."""
    src = Path(src)
    ckpt = load_checkpoint_file(src)
    state = _state_dict_of(ckpt, src)
    model_cfg = (ckpt.get("config") or {}).get("model") if isinstance(ckpt.get("config"), Mapping) else None
    if fmt == "auto":
        fmt = (model_cfg or {}).get("type", "")
        if fmt not in CHECKPOINT_FORMATS:
            found = find_detkit(state)
            if found is None:
                raise CheckpointError(f"{src}: cannot tell the model type (no config in the checkpoint); "
                                      f"name it with --format {{{','.join(CHECKPOINT_FORMATS.names())}}}")
            fmt = found[0]
    module = get_format(fmt)
    official = {"model": module.to_official(state, model_cfg=model_cfg)}
    save_checkpoint(official, out)
    return official


def build_parser(prog: str = "detkit convert") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Convert official DETR / LW-DETR checkpoints to detkit "
                                "checkpoints (default) or back (--to official).")
    p.add_argument("src", help="checkpoint to read")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.num_queries=300 (with --config)")
    p.add_argument("--out", required=True, help="file to write")
    p.add_argument("--format", default="auto", choices=("auto", *CHECKPOINT_FORMATS.names()),
                   help="official layout (default: auto)")
    p.add_argument("--config", help="detkit config of the same model variant (required for --to detkit)")
    p.add_argument("--to", default="detkit", choices=("detkit", "official"), help="direction (default: detkit)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load SRC with full unpickling (torch.load weights_only=False); only for files you trust, "
                        "e.g. official releases that pickled their argparse namespace")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "detkit convert") -> int:
    """Run the converter; returns the exit code (0 ok, 1 user error). Argument errors exit with 2 (argparse)."""
    args = build_parser(prog).parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.to == "official":
            if args.config or args.overrides:
                raise ConfigError("--config and overrides are only used with --to detkit")
            if args.trust_pickle:
                raise ConfigError("--trust-pickle is only for reading official checkpoints (--to detkit)")
            ckpt = convert_to_official(args.src, args.out, args.format)
            n = len(ckpt["model"])
        else:
            if not args.config:
                raise ConfigError("--config is required to convert to detkit (the config of the same model variant, "
                                  "e.g. configs/detr_r50.yaml)")
            ckpt = convert_to_detkit(args.src, args.out, args.config, args.overrides, args.format, args.trust_pickle)
            n = len(ckpt["model"])
    except DetkitError as e:
        print(f"error: {e}", file=sys.stderr)
        for note in getattr(e, "__notes__", ()):
            print(f"  {note}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({n} tensors, {args.to} layout)")
    return 0
