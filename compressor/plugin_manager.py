"""Load plugins: the built-in ones and third-party ones take the same entry-point path."""

from __future__ import annotations

import importlib
import importlib.util
import os
import traceback
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType

import pluggy

from compressor import hookspecs
from compressor.errors import PluginError
from compressor.recipe import did_you_mean

ENTRY_POINT_GROUP = "compressor.plugins"
# Like PYTEST_DISABLE_PLUGIN_AUTOLOAD: only the project's own plugins and `-p NAME` load.
AUTOLOAD_ENV = "COMPRESSOR_DISABLE_PLUGIN_AUTOLOAD"
OWN_DISTRIBUTION = "compressor"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    module: str
    distribution: str
    version: str

    @property
    def origin(self) -> str:
        return f"{self.distribution} {self.version}".strip()


def make_plugin_manager(
    disabled: tuple[str, ...] | list[str] = (),
    enabled: tuple[str, ...] | list[str] = (),
    extra: tuple[object, ...] = (),
) -> tuple[pluggy.PluginManager, list[PluginInfo]]:
    """A plugin manager with every entry-point plugin loaded, minus `disabled`.

    `enabled` names entry points to load even when autoloading is off, or importable modules.
    `extra` are plugin objects registered directly (tests use this).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    blocked = set(disabled)
    autoload = not os.environ.get(AUTOLOAD_ENV)
    wanted = [name for name in enabled if name not in blocked]
    for entry_point in _entry_points():
        dist = entry_point.dist
        dist_name = dist.metadata["Name"] if dist else "?"
        if entry_point.name in blocked:
            continue
        own = dist_name == OWN_DISTRIBUTION
        if not (autoload or own or entry_point.name in wanted):
            continue
        if entry_point.name in wanted:
            wanted.remove(entry_point.name)
        info = PluginInfo(
            entry_point.name, entry_point.value, dist_name, dist.version if dist else ""
        )
        try:
            module = entry_point.load()
        except Exception as exc:
            raise PluginError(
                f"plugin {info.name!r} ({info.origin}) failed to import {info.module!r}: "
                f"{import_failure(exc)}\n  disable it with -p no:{info.name} "
                f"or set {AUTOLOAD_ENV}=1; --traceback shows the whole traceback"
            ) from exc
        _register(pm, module, info)
        infos.append(info)
    for name in wanted:
        module = _import_named(name)
        info = PluginInfo(name, name, "-p", "")
        _register(pm, module, info)
        infos.append(info)
    for plugin in extra:
        name = getattr(plugin, "__name__", type(plugin).__name__)
        info = PluginInfo(name, name, "registered in code", "")
        _register(pm, plugin, info)
        infos.append(info)
    return pm, infos


def _import_named(name: str) -> object:
    """`-p NAME` that is no entry point: an importable module of that name."""
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is not there
        found = False
    if not found:
        known = [ep.name for ep in _entry_points()]
        raise PluginError(
            f"-p {name}: no plugin entry point or importable module of that name"
            f"{did_you_mean(name, known)}; entry points: {', '.join(sorted(known))}"
        )
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise PluginError(
            f"-p {name}: the module was found but importing it failed: {import_failure(exc)}"
            "\n  --traceback shows the whole traceback"
        ) from exc


def import_failure(exc: BaseException) -> str:
    """What went wrong, then where: the file and line of the failing statement (a syntax
    error's own position)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"SyntaxError: {exc.msg} (at {exc.filename}:{exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "importlib" not in f.filename] or frames
    where = f" (at {user[-1].filename}:{user[-1].lineno})" if user else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _entry_points() -> list[metadata.EntryPoint]:
    # One distribution can appear twice (editable installs); keep the first of each name.
    seen: dict[str, metadata.EntryPoint] = {}
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        seen.setdefault(entry_point.name, entry_point)
    return list(seen.values())


def _register(pm: pluggy.PluginManager, plugin: object, info: PluginInfo) -> None:
    if pm.has_plugin(info.name):
        raise PluginError(f"two plugins are named {info.name!r}; the second is {info.origin}")
    try:
        pm.register(plugin, name=info.name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"plugin {info.name!r} ({info.origin}) registers a bad hook: {exc}"
        ) from exc
    known = [h for h in dir(hookspecs) if h.startswith(f"{hookspecs.PROJECT}_")]
    for attr in dir(plugin):
        if attr.startswith(f"{hookspecs.PROJECT}_") and attr not in known:
            if isinstance(plugin, ModuleType) and not callable(getattr(plugin, attr)):
                continue
            pm.unregister(name=info.name)
            raise PluginError(
                f"plugin {info.name!r} ({info.origin}) defines unknown hook {attr!r}"
                f"{did_you_mean(attr, known)}; hooks: {', '.join(known)}"
            )
