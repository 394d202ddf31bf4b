"""Composable YAML configs.

``compose(path, overrides)`` reads a YAML file, merges its ``defaults:`` list (paths relative to the file, merged left
to right), then the file body, then command-line dotlist overrides (``model.num_queries=300``), resolves
``${...}`` interpolations last (so an override of ``model.hidden_dim`` reaches every place that refers to it) and
validates the ``train``, ``data``, ``runtime`` and ``plugins`` sections against the dataclass schemas below. The
``model`` section is checked by the recipe and factory signatures when it is built (see :mod:`detkit.registry`).

Merge rules: mappings merge by key; lists replace; a mapping whose ``type`` differs from the inherited one replaces
the inherited mapping whole (so swapping ``backbone: {type: timm}`` for a ViT leaves no stale ViT keys); a layer that
sets ``data.num_workers`` or ``runtime.threads`` clears the inherited CPU-only value of ``runtime.cpu`` (the later
setting wins, on the CPU too).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from detkit.errors import ConfigError
from detkit.registry import check_type, did_you_mean

# ---------------------------------------------------------------------------------------------------------------------
# Schemas. Keys equal the names the engine reads; every default lives here and nowhere else.
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """``train:`` — optimisation and schedule."""

    epochs: int | None = 12  # null: derived from the training split (detkit.engine.recipe)
    batch_size: int = 4  # per process
    eval_batch_size: int = 0  # per process; 0 = batch_size
    accumulate: int = 1  # gradient accumulation steps per optimizer step
    lr: float = 1e-4
    lr_backbone: float = 1e-5  # DETR: backbone learning rate
    lr_encoder: float = 1.5e-4  # LW-DETR: ViT learning rate before layer-wise decay
    lr_vit_layer_decay: float = 0.8
    lr_component_decay: float = 0.7
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1  # 0 disables clipping
    lr_schedule: str = "step"  # step | cosine
    lr_drop: int = 200  # epoch of the step decay (step schedule)
    lr_drop_factor: float = 0.1
    warmup_iters: int | None = 0  # optimizer steps of linear warm-up; null: derived (3% of the steps)
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of the base lr
    ema: bool = False
    ema_decay: float = 0.9997
    ema_tau: int = 0  # EMA warm-up: decay * (1 - exp(-updates / ema_tau)); 0 = constant decay
    amp: str = "none"  # none | bf16 | fp16 (GPU; bf16 also on CPU); matcher and box costs always run in fp32
    seed: int = 42
    deterministic: bool = False
    eval_interval: int | None = 1  # epochs between evaluations; 0 = only at the end; null: derived
    checkpoint_interval: int = 1  # epochs between checkpoint_last.pth writes (always after the last epoch)
    checkpoint_steps: int = 0  # also write checkpoint_last.pth every N optimizer steps inside an epoch; 0 = off
    checkpoint_minutes: float = 5.0  # also write it when this much time passed since the last write; 0 = off
    resume: str | None = None  # None, "auto" (last checkpoint in runtime.output_dir) or a path
    finetune_from: str | None = None  # weights to start from; class-head rows are matched by class name
    early_stop_patience: int = 0  # evaluations without mAP improvement before stopping; 0 = off
    best_metric: str = "AP"  # COCO metric that selects checkpoint_best.pth and drives early stopping
    max_bad_steps: int = 10  # consecutive non-finite losses/gradients before training stops
    log_interval: int = 10  # steps between log lines (non-interactive terminals)
    max_steps: int = 0  # stop after this many optimizer steps; 0 = no limit (smoke tests, benchmarks)
    max_minutes: float = 0.0  # end training after this much training time, the lr schedule fitted to it; 0 = off
    callbacks: list[Any] = field(default_factory=list)  # extra CALLBACKS nodes, e.g. [{type: my_logger}]


@dataclass
class DataConfig:
    """``data:`` — data set, splits and augmentation pipelines (see :mod:`detkit.data`)."""

    format: str = "auto"  # auto (detected from root; synthetic when root is unset) | coco | yolo | voc | synthetic
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"  # "val" also finds "valid" / "validation" folders and keys
    num_workers: int = 2
    # TRANSFORMS nodes (presets detr_train/detr_val/lwdetr_train/lwdetr_val, or {type: compose, transforms: [...]});
    # null = no augmentation (normalisation only)
    train_transforms: dict[str, Any] | None = field(default_factory=lambda: {"type": "lwdetr_train"})
    val_transforms: dict[str, Any] | None = field(default_factory=lambda: {"type": "lwdetr_val"})
    synthetic: dict[str, Any] = field(default_factory=dict)  # options of the built-in synthetic data set
    label_map: str = "contiguous"  # contiguous | coco_official (category ids as label indices, as the official code)
    classes: list[str] | None = None  # VOC: class names and order (default: the 20 VOC classes, else names found)


@dataclass
class CpuRuntimeConfig:
    """``runtime.cpu:`` — speed settings that apply only when the run is on the CPU (``runtime.device: cpu``, or
    ``auto`` on a machine without a usable GPU); each set key replaces its general setting there, null keeps it.
    On a GPU they are ignored (see :func:`for_device`). A later layer that sets the general key (a config file
    after the one setting ``runtime.cpu``, or the command line) clears the ``runtime.cpu`` key (:func:`merge_layer`)."""

    threads: int | None = None  # replaces runtime.threads on the CPU
    num_workers: int | None = None  # replaces data.num_workers on the CPU


#: ``runtime.cpu`` key -> (section, key) of the general setting it replaces on the CPU
CPU_SETTINGS: dict[str, tuple[str, str]] = {"threads": ("runtime", "threads"), "num_workers": ("data", "num_workers")}


@dataclass
class RuntimeConfig:
    """``runtime:`` — where and how the job runs."""

    output_dir: str = "runs/default"
    device: str = "auto"  # auto (a GPU when one is usable, else the CPU; detkit.engine.device) | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    cpu: CpuRuntimeConfig = field(default_factory=CpuRuntimeConfig)  # settings only for runs on the CPU
    tf32: bool = True  # CUDA: fp32 matmuls and convolutions use TF32 tensor cores; false = full fp32 (no effect on CPU)
    dist_backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    dist_timeout_s: int = 600  # a collective waiting longer than this fails (a crashed rank stops the others)
    find_unused_parameters: bool = False  # DDP: set when some parameters get no gradient in a step
    sync_bn: bool = True  # DDP: BatchNorm statistics over the global batch (official LW-DETR; DETR's are frozen)
    progress: str = "auto"  # auto (bar on a terminal) | bar | log
    tensorboard: bool = True  # write TensorBoard event files to the run directory
    plot: bool = True  # write curves.png (loss and mAP) at the end of the run


@dataclass
class PluginsConfig:
    """``plugins:`` — which plugins run."""

    disable: list[str] = field(default_factory=list)  # entry-point names to turn off (must be installed)
    imports: list[str] = field(default_factory=list)  # local modules to import (uninstalled plugin code)


SCHEMAS: dict[str, type] = {"train": TrainConfig, "data": DataConfig, "runtime": RuntimeConfig, "plugins": PluginsConfig}
TOP_LEVEL_KEYS = ("model", *SCHEMAS)


# ---------------------------------------------------------------------------------------------------------------------
# Loading and merging
# ---------------------------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` (no dot) as a float, as YAML 1.2 and every user expect."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _read_yaml(path: Path, included_from: Path | None) -> dict[str, Any]:
    where = f" (listed in defaults of {included_from})" if included_from else ""
    if not path.is_file():
        hint = ""
        if path.parent.is_dir():
            hint = did_you_mean(path.name, [p.name for p in path.parent.glob("*.yaml")])
        raise ConfigError(f"config file not found: {path}{where}{hint}")
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {path}{where}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping at the top level, got {type(data).__name__}")
    return data


def merge(base: Any, new: Any) -> Any:
    """Merge ``new`` into ``base`` (plain containers) with detkit's three rules; returns a new object."""
    if isinstance(base, Mapping) and isinstance(new, Mapping):
        if "type" in new and "type" in base and new["type"] != base["type"]:
            return _copy(new)  # a changed type replaces the whole node
        out = {k: _copy(v) for k, v in base.items()}
        for key, value in new.items():
            out[key] = merge(out[key], value) if key in out else _copy(value)
        return out
    return _copy(new)  # lists and scalars replace


def merge_layer(base: Mapping[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`merge` one config layer (a defaults file, a file body, the command line) into what came before.

    The later setting wins, also on the CPU: a layer that sets a general setting of :data:`CPU_SETTINGS`
    (``data.num_workers``, ``runtime.threads``) without its ``runtime.cpu`` key clears the inherited ``runtime.cpu``
    key, so ``data.num_workers=0`` on the command line means 0 workers on the CPU too.
    """
    out = merge(base, layer)
    cpu_layer = _node(_node(layer, "runtime"), "cpu")
    for key, (section, general) in CPU_SETTINGS.items():
        if general in _node(layer, section) and key not in cpu_layer:
            cpu = _node(_node(out, "runtime"), "cpu")
            if cpu.get(key) is not None:
                cpu[key] = None  # ``out`` is a fresh copy
    return out


def _node(tree: Any, key: str) -> Any:
    """``tree[key]`` when both are mappings, else an empty mapping (bad shapes are reported by validation)."""
    value = tree.get(key) if isinstance(tree, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy(v) for v in value]
    return value


def _load_tree(path: Path, stack: tuple[Path, ...], included_from: Path | None = None) -> dict[str, Any]:
    path = path.resolve()
    if path in stack:
        cycle = " -> ".join(str(p) for p in (*stack[stack.index(path) :], path))
        raise ConfigError(f"include cycle in config defaults: {cycle}")
    data = _read_yaml(path, included_from)
    defaults = data.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(f"{path}: 'defaults' must be a list of relative file paths, got {defaults!r}")
    merged: dict[str, Any] = {}
    for entry in defaults:
        merged = merge_layer(merged, _load_tree(path.parent / entry, (*stack, path), included_from=path))
    return merge_layer(merged, data)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "model.backbone={type: timm}"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: bad key {key!r}")
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value: {e}") from e
        node: dict[str, Any] = {}
        cursor = node
        parts = key.split(".")
        for part in parts[:-1]:
            cursor[part] = {}
            cursor = cursor[part]
        cursor[parts[-1]] = value
        out = merge(out, node)
    return out


def compose(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> DictConfig:
    """Load ``path`` with its ``defaults``, apply dotlist ``overrides``, resolve interpolations and validate.

    Returns a read-only, fully resolved :class:`~omegaconf.DictConfig`. Every error is a :class:`ConfigError` that
    names the file or the full key.
    """
    tree = _load_tree(Path(path), ())
    tree = merge_layer(tree, parse_overrides(overrides))
    _check_top_level(tree, Path(path))
    try:
        cfg = OmegaConf.create(tree)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"cannot resolve config{f' key {key!r}' if key else ''}: {e.msg if hasattr(e, 'msg') else e}") from e
    validated = {k: _validate_section(k, cfg.get(k)) for k in SCHEMAS}
    for k, v in validated.items():
        cfg[k] = v
    if "model" not in cfg:
        cfg.model = {}
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _check_top_level(tree: Mapping[str, Any], path: Path) -> None:
    for key in tree:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(
                f"{path}: unknown top-level key {key!r}{did_you_mean(str(key), TOP_LEVEL_KEYS)} "
                f"(allowed: {', '.join(TOP_LEVEL_KEYS)})"
            )


def _validate_section(name: str, value: Any) -> dict[str, Any]:
    """Check a schema section: unknown keys get "did you mean" with the full key, wrong types name key and type."""
    if value is None:
        value = {}
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, Mapping):
        raise ConfigError(f"config section {name!r} must be a mapping, got {value!r}")
    schema = SCHEMAS[name]
    problems = _schema_problems(name, value, schema)
    if problems:
        raise ConfigError("; ".join(problems))
    defaults = dataclasses.asdict(schema())
    return merge(defaults, dict(value))


def _schema_problems(prefix: str, value: Mapping[str, Any], schema: type) -> list[str]:
    """The unknown keys and wrong types of ``value`` against ``schema``; nested schemas (``runtime.cpu``) too."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = _schema_hints(schema)
    problems = []
    for key, item in value.items():
        if key not in fields:
            problems.append(f"unknown key '{prefix}.{key}'{did_you_mean(str(key), fields)}")
        elif dataclasses.is_dataclass(hints[key]):
            if item is None:
                continue  # null: the nested defaults
            if not isinstance(item, Mapping):
                problems.append(f"'{prefix}.{key}' expects a mapping, got {item!r}")
            else:
                problems.extend(_schema_problems(f"{prefix}.{key}", item, hints[key]))
        else:
            err = check_type(item, hints[key])
            if err:
                problems.append(f"'{prefix}.{key}' {err}")
    return problems


def _schema_hints(schema: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(schema)


def for_device(cfg: DictConfig, device_type: str) -> DictConfig:
    """``cfg`` as it applies to a run on ``device_type`` (``"cpu"``, ``"cuda"``, ...), read-only.

    On the CPU every ``runtime.cpu`` key that is set replaces the general setting it names in :data:`CPU_SETTINGS`
    (``runtime.cpu.threads`` -> ``runtime.threads``, ``runtime.cpu.num_workers`` -> ``data.num_workers``), so that
    a schedule tuned for a small CPU does not slow a GPU run down; on any other device ``cfg`` is returned as is.
    The engine calls it once the device is known; what it returns is the config the run saves and reads.
    """
    if device_type != "cpu":
        return cfg
    cpu = cfg.runtime.get("cpu") or {}
    changes = {key: cpu[key] for key in CPU_SETTINGS if cpu.get(key) is not None}
    if not changes:
        return cfg
    tree = to_container(cfg)
    for key, value in changes.items():
        section, general = CPU_SETTINGS[key]
        tree.setdefault(section, {})[general] = value
    new = OmegaConf.create(tree)
    OmegaConf.set_readonly(new, True)
    return new


def to_container(node: Any) -> Any:
    """A resolved config node as plain dicts and lists (what factories and recipes receive)."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True, sort_keys=False)


def save_resolved(cfg: DictConfig, run_dir: str | os.PathLike[str], name: str = "config.yaml") -> Path:
    """Write the fully resolved config to ``run_dir/name`` atomically and return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / name
    tmp = target.with_name(f".{name}.tmp")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, target)
    return target
