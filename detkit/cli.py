"""The ``detkit`` console script.

``detkit list [KIND]`` · ``detkit show KIND NAME`` · ``detkit check CONFIG [KEY=VALUE ...]`` and the job commands
``train``, ``eval``, ``predict``, ``export``, ``bench``, ``convert``, ``data``, each implemented next to the code it
drives (see ``COMMANDS``). A user error (:class:`detkit.errors.DetkitError`) prints one message and exits 2; add
``--debug`` anywhere to see the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from detkit.errors import DetkitError

if TYPE_CHECKING:
    import torch.nn as nn
    from omegaconf import DictConfig

#: sub-command -> "module:function" taking the remaining argv and returning an exit code
COMMANDS: dict[str, tuple[str, str]] = {
    "list": ("detkit.cli:list_main", "list registered components with their origin"),
    "show": ("detkit.cli:show_main", "show the signature and docstring of a component"),
    "check": ("detkit.cli:check_main", "compose and validate a config, build its model on the meta device"),
    "train": ("detkit.engine.launch:train_main", "train a detector (works under torchrun)"),
    "eval": ("detkit.engine.eval_cli:eval_main", "evaluate a checkpoint with COCO metrics"),
    "predict": ("detkit.predict.cli:predict_main", "run a checkpoint on images, write annotated images and JSON"),
    "export": ("detkit.export.cli:export_main", "export a checkpoint to ONNX and verify it"),
    "bench": ("detkit.bench:bench_main", "measure parameters, FLOPs, latency and memory"),
    "convert": ("detkit.convert.cli:main", "convert official DETR / LW-DETR checkpoints"),
    "data": ("detkit.data.cli:main", "check a data set folder, or write the synthetic data set"),
}


def _resolve(target: str) -> Callable[[list[str]], int]:
    module_name, _, func = target.partition(":")
    return getattr(importlib.import_module(module_name), func)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``detkit`` script and of every ``tools/*.py`` wrapper; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DETKIT_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        _print_usage()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        from detkit.registry import did_you_mean

        print(f"detkit: unknown command {command!r}{did_you_mean(command, COMMANDS)}", file=sys.stderr)
        _print_usage(sys.stderr)
        return 2
    try:
        return int(_resolve(COMMANDS[command][0])(rest) or 0)
    except KeyboardInterrupt:
        print(f"detkit {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        if _is_user_error(e):
            prefix = "" if isinstance(e, DetkitError) else f"{type(e).__name__}: "
            print(f"detkit {command}: error: {prefix}{_message(e)}", file=sys.stderr)
            return 2
        if not debug:  # a bug or an unexpected failure: still one readable message
            print(f"detkit {command}: error: {type(e).__name__}: {_message(e)}\n"
                  "(this looks like a bug or an unexpected environment problem; rerun with --debug for the traceback)",
                  file=sys.stderr)
        return 1


def _is_user_error(e: BaseException) -> bool:
    """A DetkitError, or a value/type error a factory raised while building from the config (it names the node)."""
    if isinstance(e, DetkitError):
        return True
    notes = getattr(e, "__notes__", [])
    return isinstance(e, (ValueError, TypeError)) and any(n.startswith("while building ") for n in notes)


def _message(e: BaseException) -> str:
    notes = getattr(e, "__notes__", [])
    return "\n".join([str(e), *notes])


def _print_usage(stream=sys.stdout) -> None:  # type: ignore[no-untyped-def]
    print("usage: detkit COMMAND [ARGS ...] [--debug]\n\ncommands:", file=stream)
    for name, (_, text) in COMMANDS.items():
        print(f"  {name:<9} {text}", file=stream)


# -- list / show / check -------------------------------------------------------------------------------------------


def list_main(argv: list[str]) -> int:
    """``detkit list [KIND]``: every registered name with its origin (distribution and version for plugins)."""
    from detkit.registry import REGISTRIES, did_you_mean

    parser = argparse.ArgumentParser(prog="detkit list", description=list_main.__doc__)
    parser.add_argument("kind", nargs="?", help=f"one of: {', '.join(REGISTRIES)}")
    args = parser.parse_args(argv)
    kinds = [args.kind] if args.kind else list(REGISTRIES)
    for kind in kinds:
        if kind not in REGISTRIES:
            raise DetkitError(f"unknown kind {kind!r}{did_you_mean(kind, REGISTRIES)} (kinds: {', '.join(REGISTRIES)})")
    from detkit import plugins

    for kind in kinds:
        entries = REGISTRIES[kind].entries()
        print(f"{kind} ({len(entries)})")
        for entry in entries:
            print(f"  {entry.name:<24} {entry.origin}")
    for failed in plugins.failed_plugins():
        print(f"failed plugin {failed.name!r} ({failed.distribution} {failed.version}): {failed.error}")
    return 0


def show_main(argv: list[str]) -> int:
    """``detkit show KIND NAME``: the factory's signature and docstring (the keys its config node accepts)."""
    from detkit.registry import REGISTRIES, did_you_mean

    parser = argparse.ArgumentParser(prog="detkit show", description=show_main.__doc__)
    parser.add_argument("kind")
    parser.add_argument("name")
    args = parser.parse_args(argv)
    if args.kind not in REGISTRIES:
        raise DetkitError(f"unknown kind {args.kind!r}{did_you_mean(args.kind, REGISTRIES)}")
    entry = REGISTRIES[args.kind].entry(args.name)
    print(f"{args.kind} {entry.name!r} from {entry.origin}")
    print(f"{getattr(entry.factory, '__name__', entry.name)}{inspect.signature(entry.factory)}")
    print()
    print(inspect.getdoc(entry.factory) or "(no docstring)")
    return 0


def check_main(argv: list[str]) -> int:
    """``detkit check CONFIG [KEY=VALUE ...]``: compose, validate, build the model on ``meta``; print YAML and a table."""
    import torch
    from omegaconf import OmegaConf

    from detkit import plugins
    from detkit.config import compose, to_yaml
    from detkit.models.build import build_model

    parser = argparse.ArgumentParser(prog="detkit check", description=check_main.__doc__)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--quiet", action="store_true", help="print only the component table")
    args = parser.parse_args(argv)
    cfg = compose(args.config, args.overrides)
    plugins.configure(cfg.plugins.disable, cfg.plugins.imports)
    if not args.quiet:
        print(to_yaml(cfg))
    from detkit.config import to_container
    from detkit.engine.recipe import placeholders
    from detkit.engine.setup import with_num_classes
    from detkit.weights.keys import split_loader_keys

    split_loader_keys(to_container(cfg.model))  # the loader keys' types (the files are read at train time)
    model_tree, notes = placeholders({"model": to_container(cfg.model)})
    for note in notes:
        print(note)
    model_cfg = OmegaConf.create(model_tree["model"])
    if model_cfg.get("num_classes", "absent") is None:  # filled from the data set at train time
        model_cfg = with_num_classes(OmegaConf.create(model_tree), 80).model
        print("note: model.num_classes is null (taken from the data set at train time); checked with 80")
    with torch.device("meta"):
        model = build_model(model_cfg)
    print(component_table(model))
    print(device_note(cfg))
    return 0


def device_note(cfg: DictConfig) -> str:
    """Where ``cfg`` would run on this machine: the resolved device and the thread / worker counts it gets there."""
    from detkit.config import for_device
    from detkit.engine.device import resolve_device

    try:
        device = resolve_device(str(cfg.runtime.device))
    except DetkitError as e:
        return f"on this machine: runtime.device={cfg.runtime.device} cannot run here: {e}"
    effective = for_device(cfg, device.type)
    threads = int(effective.runtime.threads)
    return (f"on this machine: runtime.device={cfg.runtime.device} -> {device}, runtime.threads={threads}"
            f"{' (torch default)' if threads <= 0 else ''}, data.num_workers={effective.data.num_workers}")


def component_table(model: nn.Module) -> str:
    """One row per direct child module: name, class, parameters (all / trainable)."""
    rows = [("component", "class", "params", "trainable")]
    total = trainable = 0
    for name, child in model.named_children():
        n = sum(p.numel() for p in child.parameters())
        t = sum(p.numel() for p in child.parameters() if p.requires_grad)
        total += n
        trainable += t
        rows.append((name, type(child).__name__, f"{n:,}", f"{t:,}"))
    direct = [p for _, p in model.named_parameters(recurse=False)]
    if direct:
        n = sum(p.numel() for p in direct)
        t = sum(p.numel() for p in direct if p.requires_grad)
        total += n
        trainable += t
        rows.append(("(own parameters)", "", f"{n:,}", f"{t:,}"))
    rows.append(("total", type(model).__name__, f"{total:,}", f"{trainable:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0 or i == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
