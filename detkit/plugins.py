"""Built-in component modules, entry-point plugins and the pluggy plugin manager.

- Built-in modules (every module under ``BUILTIN_PACKAGES``) are imported on the first registry lookup; importing a module registers its
  components.
- Third-party distributions declare ``[project.entry-points."detkit.plugins"] name = "module"``. Each one is imported
  in isolation: a plugin that raises is skipped with a warning and named in later lookup errors.
- ``DETKIT_DISABLE_PLUGIN_AUTOLOAD=1`` turns entry-point discovery off; a config's ``plugins.disable`` removes named
  plugins and ``plugins.imports`` imports local, uninstalled modules.
- pluggy carries engine events only (see :mod:`detkit.hookspecs`); a plugin module that defines ``@hookimpl``
  functions is registered on the manager automatically.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import traceback
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from detkit import registry
from detkit.errors import PluginError
from detkit.registry import did_you_mean, registering_as

if TYPE_CHECKING:
    import importlib.metadata as md

ENTRY_POINT_GROUP = "detkit.plugins"
DISABLE_ENV = "DETKIT_DISABLE_PLUGIN_AUTOLOAD"

hookimpl = pluggy.HookimplMarker("detkit")

#: packages whose modules register detkit's own components; every module under them is imported on the first lookup
BUILTIN_PACKAGES: tuple[str, ...] = (
    "detkit.models", "detkit.data", "detkit.engine.callbacks", "detkit.weights.formats",
)


@dataclass
class PluginInfo:
    """One entry point of the ``detkit.plugins`` group and what became of it."""

    name: str
    module: str
    distribution: str
    version: str
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_lock = threading.RLock()
_state: dict[str, Any] = {"builtins": False, "entry_points": False}
_loaded: dict[str, PluginInfo] = {}
_failed: dict[str, PluginInfo] = {}
_disabled: set[str] = set()
_manager: pluggy.PluginManager | None = None


def builtin_modules() -> list[str]:
    """Every module under :data:`BUILTIN_PACKAGES` (packages that do not exist yet are skipped)."""
    import pkgutil  # here, like importlib.metadata below: ``import detkit`` imports this module

    names: list[str] = []
    for package_name in BUILTIN_PACKAGES:
        try:
            package = importlib.import_module(package_name)
        except ModuleNotFoundError as e:
            if e.name == package_name:
                continue
            raise
        names.append(package_name)
        for info in pkgutil.walk_packages(package.__path__, package_name + "."):
            names.append(info.name)
    return names


def load_builtins() -> None:
    """Import every built-in component module (once); importing a module registers its components."""
    with _lock:
        if _state["builtins"]:
            return
        _state["builtins"] = True
        try:
            for name in builtin_modules():
                importlib.import_module(name)
        except BaseException:
            _state["builtins"] = False  # a broken built-in is a bug: fail again on the next lookup, loudly
            raise


def entry_points() -> list[md.EntryPoint]:
    import importlib.metadata as md

    return sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _dist_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    return dist.metadata["Name"], dist.version


def load_entry_points() -> None:
    """Import every ``detkit.plugins`` entry point (once), isolating failures."""
    with _lock:
        if _state["entry_points"]:
            return
        _state["entry_points"] = True
        if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0", "false", "False"):
            return
        for ep in entry_points():
            if ep.name in _disabled:
                continue
            dist, version = _dist_of(ep)
            info = PluginInfo(ep.name, ep.value, dist, version)
            try:
                with registering_as(f"{dist} {version} ({ep.value})", dist, version):
                    module = ep.load()
            except Exception as e:  # a broken plugin never stops detkit
                info.error = f"{type(e).__name__}: {e}"
                _failed[ep.name] = info
                for registry in _registries():
                    registry.remove_distribution(dist)
                warnings.warn(
                    f"detkit plugin {ep.name!r} from {dist} {version} failed to import and is skipped: "
                    f"{info.error}\n{''.join(traceback.format_exception(e, limit=-3))}",
                    stacklevel=2,
                )
                continue
            _loaded[ep.name] = info
            _register_hooks(module)


def ensure_loaded() -> None:
    """Called by every registry lookup: built-ins first, then entry-point plugins."""
    if _state["builtins"] and _state["entry_points"]:
        return
    load_builtins()
    load_entry_points()


def _registries() -> list[Any]:
    return list(registry.REGISTRIES.values())


def configure(disable: Iterable[str] = (), imports: Iterable[str] = ()) -> None:
    """Apply a config's ``plugins`` section: remove ``disable``d plugins, import local ``imports`` modules."""
    disable = list(disable)
    installed = {ep.name: ep for ep in entry_points()}
    unknown = [n for n in disable if n not in installed]
    if unknown:
        parts = [f"{n!r}{did_you_mean(n, installed)}" for n in unknown]
        raise PluginError(
            f"plugins.disable names plugins that are not installed: {', '.join(parts)} "
            f"(installed: {', '.join(sorted(installed)) or 'none'})"
        )
    with _lock:
        for name in disable:
            _disabled.add(name)
            info = _loaded.pop(name, None) or _failed.pop(name, None)
            if info is not None:
                for registry in _registries():
                    registry.remove_distribution(info.distribution)
                manager = plugin_manager()
                for plugin in list(manager.get_plugins()):
                    if getattr(plugin, "__name__", None) == info.module:
                        manager.unregister(plugin)
        for module_name in imports:
            if module_name in sys.modules and f"local:{module_name}" in _loaded:
                continue
            try:
                with registering_as(f"local module {module_name}", f"local:{module_name}", None):
                    module = importlib.import_module(module_name)
            except Exception as e:
                raise PluginError(f"plugins.imports: cannot import {module_name!r}: {type(e).__name__}: {e}") from e
            _loaded[f"local:{module_name}"] = PluginInfo(module_name, module_name, "local", "-")
            _register_hooks(module)


def loaded_plugins() -> list[dict[str, Any]]:
    """Name, module, distribution and version of every plugin loaded so far (recorded with each run)."""
    ensure_loaded()
    return [info.as_dict() for info in _loaded.values()]


def failed_plugins() -> list[PluginInfo]:
    return list(_failed.values())


def _failure_notes() -> list[str]:
    """A note per plugin that failed to load, for the error of an unknown registry name."""
    return [f"plugin {f.name!r} ({f.distribution}) failed to load: {f.error}" for f in failed_plugins()]


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide pluggy manager carrying the engine events of :mod:`detkit.hookspecs`."""
    global _manager
    with _lock:
        if _manager is None:
            from detkit import hookspecs

            _manager = pluggy.PluginManager("detkit")
            _manager.add_hookspecs(hookspecs)
        return _manager


def _register_hooks(module: Any) -> None:
    manager = plugin_manager()
    has_impl = any(hasattr(getattr(module, a, None), "detkit_impl") for a in dir(module))
    if has_impl and not manager.is_registered(module):
        manager.register(module)


def _reset_for_tests() -> None:
    """Forget plugin state (tests only): entry points are re-read on the next lookup."""
    global _manager
    with _lock:
        _state["entry_points"] = False
        _loaded.clear()
        _failed.clear()
        _disabled.clear()
        _manager = None


registry.set_lookup_hooks(ensure_loaded, _failure_notes)  # every registry lookup loads built-ins and plugins first
