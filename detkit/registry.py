"""The component registries.

One small generic :class:`Registry` and one instance per kind of component. A config node such as
``{type: resnet, depth: 50}`` is turned into an object by ``BACKBONES.build(node)``: ``type`` picks the factory, the
other keys are bound to the factory's signature, and values that a recipe derives from already-built modules
(channels, strides, ...) are passed as keyword arguments (``injected``).

Built-in components are imported lazily on the first lookup, so ``import detkit`` stays cheap and a source checkout
works without entry points. The loading is :mod:`detkit.plugins`' job: this module never imports it; ``import detkit``
imports :mod:`detkit.plugins`, which installs its loader here (:func:`set_lookup_hooks`).
"""

from __future__ import annotations

import contextvars
import difflib
import inspect
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from detkit.errors import ConfigError, RegistryError


@dataclass(frozen=True)
class Entry:
    """A registered factory and where it came from."""

    name: str
    factory: Callable[..., Any]
    origin: str  # "detkit.models.backbones.resnet" or "detkit-timm 0.1.0 (detkit_timm)"
    distribution: str | None = None
    version: str | None = None


_origin: contextvars.ContextVar[tuple[str, str | None, str | None] | None] = contextvars.ContextVar(
    "detkit_origin", default=None
)


@dataclass
class LookupHooks:
    """What every lookup calls first (loading the built-in modules and plugins), and the note lines an unknown name's
    error ends with (plugins that failed to load). :mod:`detkit.plugins` installs its own when it is imported."""

    before_lookup: Callable[[], None] = lambda: None
    unknown_notes: Callable[[], list[str]] = list


_hooks = LookupHooks()


def set_lookup_hooks(before_lookup: Callable[[], None], unknown_notes: Callable[[], list[str]]) -> None:
    """Install the loader every registry lookup calls first, and the notes an unknown name's error gets."""
    _hooks.before_lookup = before_lookup
    _hooks.unknown_notes = unknown_notes


def current_origin(factory: Callable[..., Any]) -> tuple[str, str | None, str | None]:
    """(origin text, distribution, version) for a factory being registered now."""
    ctx = _origin.get()
    if ctx is not None:
        return ctx
    module = getattr(factory, "__module__", "?")
    return module, None, None


@contextmanager
def registering_as(text: str, distribution: str | None, version: str | None) -> Iterator[None]:
    """Entries registered inside this block record ``text`` / ``distribution`` / ``version`` as their origin."""
    token = _origin.set((text, distribution, version))
    try:
        yield
    finally:
        _origin.reset(token)


def close_matches(word: str, choices: typing.Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` entries of ``choices`` that look like ``word`` (difflib ratio >= 0.6)."""
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` or an empty string."""
    matches = close_matches(word, choices)
    if not matches:
        return ""
    return "; did you mean " + " or ".join(repr(m) for m in matches) + "?"


class Registry:
    """Maps snake_case names to factories (classes or functions) of one kind of component."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    # -- registration -------------------------------------------------------------------------------------------
    def register(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@BACKBONES.register("resnet")``. The name defaults to the factory's ``__name__``."""

        def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
            self.add(name or factory.__name__, factory)
            return factory

        return decorator

    def add(self, name: str, factory: Callable[..., Any]) -> None:
        """Register ``factory`` as ``name``; a taken name is an error naming both origins."""
        if not name or name != name.lower() or not name.replace("_", "").isalnum():
            raise RegistryError(f"{self.kind} name {name!r} must be snake_case (lower-case letters, digits, '_')")
        origin, dist, version = current_origin(factory)
        if name in self._entries:
            old = self._entries[name]
            raise RegistryError(
                f"{self.kind} {name!r} is registered twice: first by {old.origin}, again by {origin}. "
                "Rename one of them (names are global per kind)."
            )
        self._entries[name] = Entry(name, factory, origin, dist, version)

    def remove_distribution(self, distribution: str) -> list[str]:
        """Unregister every entry that came from ``distribution``; returns the removed names."""
        gone = [n for n, e in self._entries.items() if e.distribution == distribution]
        for n in gone:
            del self._entries[n]
        return gone

    # -- lookup -------------------------------------------------------------------------------------------------
    def _entries_loaded(self) -> dict[str, Entry]:
        _hooks.before_lookup()
        return self._entries

    def names(self) -> list[str]:
        return sorted(self._entries_loaded())

    def entries(self) -> list[Entry]:
        entries = self._entries_loaded()
        return [entries[n] for n in sorted(entries)]

    def __contains__(self, name: object) -> bool:
        return name in self._entries_loaded()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries_loaded())

    def entry(self, name: str) -> Entry:
        """The :class:`Entry` for ``name``; an unknown name gets close matches and failed-plugin hints."""
        entries = self._entries_loaded()
        if name in entries:
            return entries[name]
        msg = f"unknown {self.kind} {name!r}{did_you_mean(str(name), entries)}"
        if not did_you_mean(str(name), entries):
            msg += f" (known: {', '.join(sorted(entries)) or 'none'})"
        for note in _hooks.unknown_notes():
            msg += f"\nnote: {note}"
        raise RegistryError(msg)

    def get(self, name: str) -> Callable[..., Any]:
        return self.entry(name).factory

    # -- building -----------------------------------------------------------------------------------------------
    def build(self, node: Mapping[str, Any], **injected: Any) -> Any:
        """Build the component described by ``node``.

        ``node["type"]`` names the factory; the other keys must be parameters of its signature. ``injected`` are
        values derived by the caller (a recipe) from already-built modules; they may not also be set in the config,
        and an injected value the factory does not accept is dropped (so a plugin component need not take every
        value a recipe offers). Failures inside the factory get a note ``while building <kind> '<name>'``.
        """
        if not isinstance(node, Mapping):
            raise ConfigError(
                f"a {self.kind} must be a mapping with a 'type' key, got {type(node).__name__} {node!r}"
                f" (known {self.kind} types: {', '.join(self.names())})"
            )
        if "type" not in node:
            raise ConfigError(
                f"{self.kind} node {dict(node)!r} has no 'type' key (known {self.kind} types: {', '.join(self.names())})"
            )
        name = node["type"]
        factory = self.get(name)
        kwargs = {k: v for k, v in node.items() if k != "type"}
        try:
            bound = bind_arguments(factory, kwargs, injected, what=f"{self.kind} {name!r}")
            return factory(**bound)
        except Exception as e:
            e.add_note(f"while building {self.kind} {name!r}")
            raise

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


def bind_arguments(
    factory: Callable[..., Any], kwargs: Mapping[str, Any], injected: Mapping[str, Any], what: str
) -> dict[str, Any]:
    """Check config ``kwargs`` (and ``injected`` values) against ``factory``'s signature and return the call kwargs."""
    sig = inspect.signature(factory)
    params = {n: p for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    problems: list[str] = []
    for key in kwargs:
        if key in injected:
            problems.append(f"{key!r} is derived from the other components and cannot be set in the config")
        elif key not in params and not takes_var_kw:
            problems.append(f"unexpected argument {key!r}{did_you_mean(key, params)}")
    call = dict(kwargs)
    for key, value in injected.items():
        if key in params or takes_var_kw:
            call[key] = value
    missing = [n for n, p in params.items() if p.default is p.empty and n not in call]
    if missing:
        problems.append("missing required argument" + ("s " if len(missing) > 1 else " ") + ", ".join(map(repr, missing)))
    hints = _type_hints(factory)
    for key, value in kwargs.items():
        if key in params and key in hints:
            err = check_type(value, hints[key])
            if err:
                problems.append(f"argument {key!r} {err}")
    if problems:
        raise ConfigError(f"{what}: " + "; ".join(problems) + f"\n  signature: {getattr(factory, '__name__', what)}{sig}")
    return call


def _type_hints(factory: Callable[..., Any]) -> dict[str, Any]:
    target = factory.__init__ if inspect.isclass(factory) else factory  # type: ignore[misc]
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable forward references: skip type checks rather than fail the build
        return {}


def check_type(value: Any, annotation: Any) -> str | None:
    """A short complaint if ``value`` clearly does not fit ``annotation``; ``None`` when it fits or we cannot tell.

    Only the shapes configs use are checked: bool, int, float, str, None, unions, sequences and mappings of them.
    """
    if annotation is Any or annotation is inspect.Parameter.empty:
        return None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = [check_type(value, a) for a in args]
        return None if any(e is None for e in errors) else f"expects {_type_name(annotation)}, got {value!r}"
    if annotation is type(None):
        return None if value is None else f"expects None, got {value!r}"
    if annotation is bool:
        return None if isinstance(value, bool) else f"expects bool, got {value!r}"
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else f"expects int, got {value!r}"
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"expects float, got {value!r}"
    if annotation is str:
        return None if isinstance(value, str) else f"expects str, got {value!r}"
    if origin in (list, tuple, Sequence):
        if not _is_list(value):
            return f"expects a list, got {value!r}"
        if args and origin is not tuple:
            for item in value:
                err = check_type(item, args[0])
                if err:
                    return f"expects {_type_name(annotation)}, got item {item!r}"
        return None
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        return None if isinstance(value, Mapping) else f"expects a mapping, got {value!r}"
    if annotation in (list, tuple):
        return None if _is_list(value) else f"expects a list, got {value!r}"
    return None


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


# feature extractors an image goes through first (ResNet, the LW-DETR ViT, plugins' timm models)
BACKBONES = Registry("backbone")
# layers that project backbone features to the transformer's width (DETR's input projection, LW-DETR's projector)
NECKS = Registry("neck")
# positional encodings of feature maps (sine, learned)
POSITION_ENCODINGS = Registry("position_encoding")
# encoder-decoder stacks that turn features and queries into query embeddings (DETR's, LW-DETR's deformable one)
TRANSFORMERS = Registry("transformer")
# prediction heads on query embeddings: class logits and boxes (DETR's)
HEADS = Registry("head")
# matchers that pair predictions with ground-truth boxes for the loss (Hungarian)
MATCHERS = Registry("matcher")
# training criteria and their classification losses (the set criterion, IA-BCE)
LOSSES = Registry("loss")
# post-processors that turn raw outputs into scored, labelled boxes in image pixels
POSTPROCESSORS = Registry("postprocessor")
# whole detectors, the top-level ``model.type`` of a config (DETR, LW-DETR)
DETECTORS = Registry("detector")
# data sets, ``data.type`` (COCO, VOC, YOLO, synthetic)
DATASETS = Registry("dataset")
# image-and-target transforms of the data pipelines (resize, flip, crop, recipes, albumentations)
TRANSFORMS = Registry("transform")
# training callbacks on the engine's events (EMA, norm statistics, checkpoints, logging)
CALLBACKS = Registry("callback")
# official checkpoint layouts, one per model type (detect, convert to detkit and back, adapt groups)
CHECKPOINT_FORMATS = Registry("checkpoint_format")

#: every registry by its kind string, for ``detkit list`` / ``detkit show``
REGISTRIES: dict[str, Registry] = {
    r.kind: r
    for r in (
        BACKBONES,
        NECKS,
        POSITION_ENCODINGS,
        TRANSFORMERS,
        HEADS,
        MATCHERS,
        LOSSES,
        POSTPROCESSORS,
        DETECTORS,
        DATASETS,
        TRANSFORMS,
        CALLBACKS,
        CHECKPOINT_FORMATS,
    )
}
