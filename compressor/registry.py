"""Every component the loaded plugins provide, by kind and name, with the plugin behind it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, overload

import pluggy
from pydantic import BaseModel, ValidationError

from compressor.components import Component
from compressor.errors import PluginError, RecipeError, RecipeErrors
from compressor.evaluate import Evaluator
from compressor.export import Exporter
from compressor.graph_pass import GraphPass
from compressor.loading import DataLoader, ModelLoader
from compressor.losses import LossTerm
from compressor.module_pass import ModulePass
from compressor.optim import OptimizerFactory, ScheduleFactory
from compressor.plugin_manager import PluginInfo, make_plugin_manager
from compressor.recipe import StagePreset, did_you_mean, validation_errors
from compressor.yaml_positions import KeyPath, SourceMap

# kind -> (provider hook, base class every provided component must subclass)
KINDS: dict[str, tuple[str, type[Component[Any]]]] = {
    "model_loader": ("compressor_model_loaders", ModelLoader),
    "data_loader": ("compressor_data_loaders", DataLoader),
    "module_pass": ("compressor_module_passes", ModulePass),
    "graph_pass": ("compressor_graph_passes", GraphPass),
    "loss": ("compressor_losses", LossTerm),
    "optimizer": ("compressor_optimizers", OptimizerFactory),
    "schedule": ("compressor_schedules", ScheduleFactory),
    "evaluator": ("compressor_evaluators", Evaluator),
    "exporter": ("compressor_exporters", Exporter),
    "stage_preset": ("compressor_stage_presets", StagePreset),
}


@dataclass(frozen=True)
class Provided:
    kind: str
    name: str
    cls: type[Component]
    plugin: str


class Registry:
    def __init__(self, pm: pluggy.PluginManager, plugins: list[PluginInfo]):
        self.pm = pm
        self.plugins = plugins
        self.components: dict[str, dict[str, Provided]] = {kind: {} for kind in KINDS}
        for kind, (hook_name, base) in KINDS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                try:
                    provided = impl.function() or []
                except Exception as exc:
                    raise PluginError(
                        f"plugin {impl.plugin_name!r} failed in hook {hook_name}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                for cls in provided:
                    self._add(kind, hook_name, base, cls, impl.plugin_name)

    @classmethod
    def load(
        cls,
        disabled: tuple[str, ...] | list[str] = (),
        enabled: tuple[str, ...] | list[str] = (),
        extra: tuple[object, ...] = (),
    ) -> Registry:
        return cls(*make_plugin_manager(disabled, enabled, extra))

    def _add(self, kind: str, hook: str, base: type[Component[Any]], cls: Any, plugin: str) -> None:
        where = f"plugin {plugin!r}, hook {hook}"
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"{where}: returned {cls!r}, which is not a {base.__name__} subclass")
        if not cls.name:
            raise PluginError(f"{where}: {cls.__name__} has no `name`")
        table = self.components[kind]
        if cls.name in table:
            other = table[cls.name].plugin
            raise PluginError(
                f"{kind.replace('_', ' ')} {cls.name!r} is provided by two plugins, "
                f"{other!r} and {plugin!r} ({hook}); disable one with -p no:NAME"
            )
        table[cls.name] = Provided(kind, cls.name, cls, plugin)

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def provided_by(self, plugin: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for kind, table in self.components.items():
            for provided in table.values():
                if provided.plugin == plugin:
                    out.setdefault(kind, []).append(provided.name)
        return out

    def lookup(self, kind: str, name: str, source: SourceMap | None, path: KeyPath) -> type[Any]:
        table = self.components[kind]
        if name in table:
            return table[name].cls
        allowed = ", ".join(self.names(kind)) or "(none registered)"
        problem = f"unknown {kind.replace('_', ' ')} {name!r}{did_you_mean(name, table.keys())}"
        if source is None:
            raise PluginError(f"{problem}; registered: {allowed}")
        raise RecipeError(source.locate(path), problem, allowed)

    @overload
    def create(
        self,
        kind: Literal["model_loader"],
        name: str,
        options: dict[str, Any],
        source: SourceMap | None = ...,
        path: KeyPath = ...,
        name_path: KeyPath | None = ...,
    ) -> ModelLoader[Any]: ...

    @overload
    def create(
        self,
        kind: Literal["data_loader"],
        name: str,
        options: dict[str, Any],
        source: SourceMap | None = ...,
        path: KeyPath = ...,
        name_path: KeyPath | None = ...,
    ) -> DataLoader[Any]: ...

    @overload
    def create(
        self,
        kind: Literal["module_pass"],
        name: str,
        options: dict[str, Any],
        source: SourceMap | None = ...,
        path: KeyPath = ...,
        name_path: KeyPath | None = ...,
    ) -> ModulePass[Any]: ...

    @overload
    def create(
        self,
        kind: Literal["graph_pass"],
        name: str,
        options: dict[str, Any],
        source: SourceMap | None = ...,
        path: KeyPath = ...,
        name_path: KeyPath | None = ...,
    ) -> GraphPass[Any]: ...

    @overload
    def create(
        self,
        kind: Literal["loss"],
        name: str,
        options: dict[str, Any],
        source: SourceMap | None = ...,
        path: KeyPath = ...,
        name_path: KeyPath | None = ...,
    ) -> LossTerm[Any]: ...

    @overload
    def create(
        self,
        kind: Literal["optimizer"],
        name: str,
        options: dict[str, Any],
        source: SourceMap | None = ...,
        path: KeyPath = ...,
        name_path: KeyPath | None = ...,
    ) -> OptimizerFactory[Any]: ...

    @overload
    def create(
        self,
        kind: Literal["schedule"],
        name: str,
        options: dict[str, Any],
        source: SourceMap | None = ...,
        path: KeyPath = ...,
        name_path: KeyPath | None = ...,
    ) -> ScheduleFactory[Any]: ...

    @overload
    def create(
        self,
        kind: Literal["evaluator"],
        name: str,
        options: dict[str, Any],
        source: SourceMap | None = ...,
        path: KeyPath = ...,
        name_path: KeyPath | None = ...,
    ) -> Evaluator[Any]: ...

    @overload
    def create(
        self,
        kind: Literal["exporter"],
        name: str,
        options: dict[str, Any],
        source: SourceMap | None = ...,
        path: KeyPath = ...,
        name_path: KeyPath | None = ...,
    ) -> Exporter[Any]: ...

    @overload
    def create(
        self,
        kind: Literal["stage_preset"],
        name: str,
        options: dict[str, Any],
        source: SourceMap | None = ...,
        path: KeyPath = ...,
        name_path: KeyPath | None = ...,
    ) -> StagePreset[Any]: ...

    @overload
    def create(
        self,
        kind: str,
        name: str,
        options: dict[str, Any],
        source: SourceMap | None = ...,
        path: KeyPath = ...,
        name_path: KeyPath | None = ...,
    ) -> Component[Any]: ...

    def create(
        self,
        kind: str,
        name: str,
        options: dict[str, Any],
        source: SourceMap | None = None,
        path: KeyPath = (),
        name_path: KeyPath | None = None,
    ) -> Component[Any]:
        """Look `name` up and build it from `options` validated against its Options model.

        Typed by kind: `create("loss", ...)` is a `LossTerm[Any]`, and so on for each kind
        of `KINDS`; a kind that is only known as a `str` gives a `Component[Any]`.

        `source` and `path` say where the options sit in the recipe, `name_path` where the
        name does (default: the `name` key beside the options); without `source` errors are
        PluginErrors (components the core builds itself, such as `strip`).
        """
        cls, validated = self.validated(kind, name, options, source, path, name_path)
        return cls(validated)

    def validated(
        self,
        kind: str,
        name: str,
        options: dict[str, Any],
        source: SourceMap | None = None,
        path: KeyPath = (),
        name_path: KeyPath | None = None,
    ) -> tuple[type[Any], BaseModel]:
        """(the class `name` stands for, `options` validated against its Options model),
        without building the component; arguments and errors as `create`."""
        cls = self.lookup(kind, name, source, (*path, "name") if name_path is None else name_path)
        try:
            return cls, cls.Options.model_validate(options)
        except ValidationError as exc:
            if source is None:
                raise PluginError(f"{kind} {name!r}: bad options: {exc}") from None
            errors = validation_errors(exc, source, path, cls.Options)
            for error in errors:
                # name the component whose options these are, and what it takes
                error.args = (f"{error} [{kind.replace('_', ' ')} {name!r}]",)
            raise RecipeErrors(errors) from None
