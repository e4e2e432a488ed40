"""Every component a recipe names (loaders, module and graph passes, losses, optimizer,
schedule, exporters), built once from its validated options, with every option error of the
recipe reported together. The plan (`compressor.plan`) builds on what this returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from compressor.errors import RecipeError, RecipeErrors
from compressor.export import BoundExporter
from compressor.graph_pass import PROVIDED, GraphPass
from compressor.loading import DataLoader, ModelLoader
from compressor.losses import BoundLoss, LossTerm
from compressor.module_pass import ModulePass
from compressor.optim import OptimizerFactory, ScheduleFactory
from compressor.recipe import Recipe
from compressor.registry import Registry
from compressor.yaml_positions import KeyPath

ROLES = ("student", "teacher")
# Passes every plan runs on both graphs, and the one that makes the deployable student; they
# are plugins, looked up by name like any other.
DEFAULT_GRAPH_PASSES = ("tap", "truncate_teacher")
STRIP_PASS = "strip"


@dataclass
class Components:
    """Every component a recipe names, each built once from its validated options."""

    data_loader: DataLoader[Any]
    model_loaders: dict[str, ModelLoader[Any]]  # by role; none for a student from the teacher
    module_passes: list[tuple[int, str, ModulePass[Any]]]  # (recipe index, target, pass)
    graph_passes: list[tuple[str, GraphPass[Any]]]  # (target: student | teacher | both, pass)
    strip: GraphPass[Any]
    losses: list[BoundLoss]
    optimizer: OptimizerFactory[Any]
    schedule: ScheduleFactory[Any]
    exporters: list[BoundExporter]

    def passes_for(self, role: str) -> list[GraphPass[Any]]:
        return [p for target, p in self.graph_passes if target in (role, "both")]


def build_components(recipe: Recipe, registry: Registry, load_student: bool = True) -> Components:
    """Every component of the recipe, built once; all option errors are reported together."""
    errors: list[RecipeError] = []
    source = recipe.source

    def make(kind: str, name: str, options: dict[str, Any], path: KeyPath, **kw: Any) -> Any:
        try:
            return registry.create(kind, name, options, source, path, **kw)
        except RecipeError as exc:
            errors.append(exc)
        except RecipeErrors as exc:
            errors.extend(exc.errors)
        return None

    model_loaders = {}
    for role, model in (("teacher", recipe.teacher), ("student", recipe.student)):
        if model is None or (role == "student" and (model.from_teacher or not load_student)):
            continue
        model_loaders[role] = make(
            "model_loader", model.loader, model.options, (role,), name_path=(role, "loader")
        )
    if recipe.student.from_teacher and recipe.student.options and load_student:
        errors.append(
            RecipeError(
                recipe.locate(("student", next(iter(recipe.student.options))), prefer_key=True),
                "student.from_teacher copies the teacher, so the student takes no loader options",
                "from_teacher: true alone (module_passes shrink the copy)",
            )
        )
    data_loader = make(
        "data_loader",
        recipe.data.loader,
        recipe.data.kwargs,
        ("data", "kwargs"),
        name_path=("data", "loader"),
    )
    module_passes: list[tuple[int, str, ModulePass[Any]]] = [
        (i, spec.target, make("module_pass", spec.name, spec.options, ("module_passes", i)))
        for i, spec in enumerate(recipe.module_passes)
    ]
    losses = []
    for i, spec in enumerate(recipe.losses):
        term = make("loss", spec.name, spec.options, ("losses", i))
        # an unknown loss (term None) is already a collected error
        weight = spec.weight if spec.weight is not None else getattr(term, "default_weight", 1.0)
        losses.append(BoundLoss(_label(spec.name, recipe.losses[:i]), weight, term, i))
    optimizer = make(
        "optimizer",
        recipe.train.optimizer.name,
        recipe.train.optimizer.options,
        ("train", "optimizer"),
    )
    schedule = make(
        "schedule", recipe.train.schedule.name, recipe.train.schedule.options, ("train", "schedule")
    )
    exporters = [
        BoundExporter(
            _label(spec.name, recipe.export[:i]),
            make("exporter", spec.name, spec.options, ("export", i)),
            i,
        )
        for i, spec in enumerate(recipe.export)
    ]
    graph_passes = _graph_passes(recipe, registry, make, [b.term for b in losses if b.term])
    if errors:
        raise RecipeErrors(errors)
    return Components(
        data_loader=data_loader,
        model_loaders=model_loaders,
        module_passes=module_passes,
        graph_passes=graph_passes,
        strip=registry.create("graph_pass", STRIP_PASS, {}),
        losses=losses,
        optimizer=optimizer,
        schedule=schedule,
        exporters=exporters,
    )


def _label(name: str, earlier: list[Any]) -> str:
    """`name`, or `name_k` for the k-th earlier entry of the same name."""
    count = sum(1 for spec in earlier if spec.name == name)
    return name if count == 0 else f"{name}_{count}"


def _graph_passes(
    recipe: Recipe, registry: Registry, make: Callable[..., Any], terms: list[LossTerm[Any]]
) -> list[tuple[str, GraphPass[Any]]]:
    # a recipe entry replaces the default pass of that name (e.g. `tap` with extra nodes);
    # every recipe entry runs, two of one name too (in recipe order)
    listed = {spec.name for spec in recipe.passes}
    passes: list[tuple[str, GraphPass[Any]]] = [
        ("both", registry.create("graph_pass", name, {}))
        for name in DEFAULT_GRAPH_PASSES
        if name not in listed
    ]
    for i, spec in enumerate(recipe.passes):
        graph_pass = make("graph_pass", spec.name, spec.options, ("passes", i))
        if graph_pass is not None:
            passes.append((spec.target, graph_pass))
    # a loss reading an `@name` tap brings the pass that provides it, with default options,
    # for the roles that read it
    readers: dict[str, set[str]] = {}
    for term in terms:
        for role, names in term.reads().items():
            for name in names:
                readers.setdefault(name, set()).add(role)
    for name, roles in readers.items():
        if name.startswith(PROVIDED) and not any(name in p.provides_taps for _, p in passes):
            table = registry.components["graph_pass"].values()
            providers = [p for p in table if name in getattr(p.cls, "provides_taps", ())]
            if providers:
                target = "both" if len(roles) > 1 else next(iter(roles))
                passes.append((target, registry.create("graph_pass", providers[0].name, {})))
    return passes


def repeated_passes(recipe: Recipe) -> list[str]:
    """Notes for a pass that a recipe lists more than once for one role: each entry runs."""
    notes = []
    for key, specs in (("module_passes", recipe.module_passes), ("passes", recipe.passes)):
        for role in ROLES:
            entries: dict[str, list[int]] = {}
            for i, spec in enumerate(specs):
                if spec.target in (role, "both"):
                    entries.setdefault(spec.name, []).append(i)
            notes += [
                f"{role}: {key} entry {name!r} runs {len(at)} times, in recipe order "
                f"({', '.join(f'{key}[{i}]' for i in at)})"
                for name, at in entries.items()
                if len(at) > 1
            ]
    return notes
