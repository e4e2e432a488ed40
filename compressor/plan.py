"""From a validated recipe to a DistillPlan: models loaded, captured, passed, losses bound.

Everything that can be wrong with a recipe is found here, before a run folder exists:
unknown components, bad options, models that do not load or capture, taps not in a graph.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from compressor.errors import CaptureError, RecipeError, RecipeErrors
from compressor.evaluate import NotAnEncoder, embeddings
from compressor.graph_pass import (
    OUTPUT,
    PROVIDED,
    SCAFFOLD_META,
    GraphPass,
    PassContext,
    TapNotFound,
    draw_graph_inputs,
    graph_inputs,
    node_shape,
    original_output,
    resolve_tap,
    run_passes,
    tapped,
)
from compressor.loading import DataBundle, DataLoader, Inputs, ModelLoader, collate, head
from compressor.losses import LossTerm, Shapes
from compressor.module_pass import ModulePassContext
from compressor.recipe import ModelSpec, Recipe, did_you_mean
from compressor.registry import Registry

ROLES = ("student", "teacher")
# Passes every plan runs on both graphs; they are plugins, looked up by name like any other.
DEFAULT_GRAPH_PASSES = ("tap", "truncate_teacher")


@dataclass
class BoundLoss:
    label: str  # the name shown in logs; unique within a plan
    weight: float
    term: LossTerm


@dataclass
class DistillPlan:
    recipe: Recipe
    registry: Registry
    device: torch.device
    data: DataBundle
    example_inputs: tuple[Any, ...]
    student: nn.Module
    student_graph: fx.GraphModule  # training form, tapped: what the engine runs
    student_eval_graph: fx.GraphModule  # eval form, stripped: what is evaluated and exported
    teacher: nn.Module | None
    teacher_graph: fx.GraphModule | None
    losses: list[BoundLoss]
    passes: dict[str, list[GraphPass]] = field(default_factory=dict)
    contexts: dict[str, PassContext] = field(default_factory=dict)
    _reference: torch.Tensor | None = field(default=None, repr=False)
    _reference_tried: bool = field(default=False, repr=False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.student_graph.parameters())
        for bound in self.losses:
            params += list(bound.term.parameters())
        return [p for p in params if p.requires_grad]

    def verify_inputs(self, batch: int = 64) -> list[tuple[Inputs, ...]]:
        """Eval samples on the CPU, at `batch` and at 1, to check exported artifacts with."""
        cpu = torch.device("cpu")
        full = collate(self.data.eval, range(min(batch, len(self.data.eval))), cpu)[0]
        return [(full,), (head(full, 1),)]

    def reference_embeddings(self) -> torch.Tensor | None:
        """The teacher's eval-set embeddings, which the embedding task scores students against
        (computed once)."""
        if self.data.task != "embedding" or self.teacher is None:
            return None
        if not self._reference_tried:  # once: a teacher that is not an encoder stays one
            self._reference_tried = True
            with contextlib.suppress(NotAnEncoder):
                self._reference = embeddings(
                    self.teacher.eval(),
                    self.data.eval,
                    self.recipe.data.eval_batch_size,
                    self.device,
                )
        return self._reference

    def capture(self, module: nn.Module, role: str) -> fx.GraphModule:
        return capture(self.registry, module, self.example_inputs, role, self.recipe.capture.method)


def select_device(recipe: Recipe) -> torch.device:
    if recipe.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if recipe.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError(recipe.locate(("device",)), "no CUDA GPU is visible", "auto, cpu")
    return torch.device(recipe.device)


def build_plan(recipe: Recipe, registry: Registry, student: nn.Module | None = None) -> DistillPlan:
    """Validate and prepare a run. Raises RecipeError(s), PluginError or CaptureError.

    `student` continues a student from an earlier stage: it is used as it is, without
    loading or module passes."""
    losses = _bind_losses(recipe, registry)
    needs_teacher = any(bound.term.reads()["teacher"] for bound in losses)
    copies_teacher = student is None and recipe.student.from_teacher
    if copies_teacher and recipe.teacher is None:
        raise RecipeError(
            recipe.locate(("student", "from_teacher"), prefer_key=True),
            "student.from_teacher is set, but the recipe has no teacher to copy",
        )
    if needs_teacher and recipe.teacher is None:
        first = next(i for i, b in enumerate(losses) if b.term.reads()["teacher"])
        raise RecipeError(
            recipe.locate(("losses", first, "name")),
            f"loss {recipe.losses[first].name!r} reads the teacher, but the recipe has no teacher",
            "add a teacher: section, or use only losses that need no teacher (ce)",
        )
    reads = {role: [n for b in losses for n in b.term.reads()[role]] for role in ROLES}
    graph_passes = {role: _bind_passes(recipe, registry, role, reads[role]) for role in ROLES}
    module_passes = [
        (
            spec.target,
            registry.create("module_pass", spec.name, spec.options, recipe, ("module_passes", i)),
        )
        for i, spec in enumerate(recipe.module_passes)
    ]
    for i, spec in enumerate([recipe.train.optimizer, recipe.train.schedule]):
        key = ("optimizer", "schedule")[i]
        registry.create(key, spec.name, spec.options, recipe, ("train", key))
    for i, spec in enumerate(recipe.export):
        registry.create("exporter", spec.name, spec.options, recipe, ("export", i))
    problems = [
        p
        for found in registry.pm.hook.compressor_validate_recipe(recipe=recipe)
        for p in found or []
    ]
    if problems:
        raise RecipeErrors([RecipeError(recipe.locate(()), problem) for problem in problems])

    device = select_device(recipe)
    data_loader: DataLoader = registry.create(
        "data_loader",
        recipe.data.loader,
        recipe.data.kwargs,
        recipe,
        ("data", "kwargs"),
        ("data", "loader"),
    )
    data = data_loader.load(recipe.data, recipe)
    if len(data.train) == 0 or len(data.eval) == 0:
        raise RecipeError(
            recipe.locate(("data",)), "the data loader returned an empty train or eval set"
        )
    # torch.export specialises a batch of 1, so capture with a few samples
    example_inputs = (collate(data.train, range(min(4, len(data.train))), device)[0],)

    teacher = None
    if needs_teacher or copies_teacher:
        assert recipe.teacher is not None
        teacher = _load_model(recipe, registry, recipe.teacher, "teacher", recipe.seed)
    if student is None:
        if copies_teacher:
            student = copy.deepcopy(teacher)
        else:
            student = _load_model(recipe, registry, recipe.student, "student", recipe.seed + 1)
        for i, (target, module_pass) in enumerate(module_passes):
            context = ModulePassContext(role=target, teacher=teacher)
            try:
                if target == "student":
                    student = module_pass(student, context)
                elif teacher is not None:
                    teacher = module_pass(teacher, context)
            except ValueError as exc:
                raise RecipeError(recipe.locate(("module_passes", i)), str(exc)) from None
    assert student is not None
    if not needs_teacher:
        teacher = None
    student.to(device).train()
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)

    captured: dict[str, fx.GraphModule] = {}
    for role, module in (("student", student), ("teacher", teacher)):
        if module is not None:
            captured[role] = capture(registry, module, example_inputs, role, recipe.capture.method)
            _check_taps(recipe, captured[role], role, losses, graph_passes[role])
    contexts = {
        role: PassContext(
            role,
            [n for n in dict.fromkeys(reads[role]) if n != OUTPUT],
            OUTPUT in reads[role],
            peer=captured.get("teacher" if role == "student" else "student"),
        )
        for role in ROLES
    }
    graphs = {
        role: run_passes(gm, graph_passes[role], contexts[role]) for role, gm in captured.items()
    }
    for gm in graphs.values():
        _refresh_shapes(gm, example_inputs, [graphs.get("student"), graphs.get("teacher")])

    student_eval_graph = deployable_student(
        registry, student, example_inputs, recipe, graph_passes["student"], contexts["student"]
    )

    shapes = {role: _shapes(graphs[role], reads[role]) if role in graphs else {} for role in ROLES}
    for i, bound in enumerate(losses):
        try:
            bound.term.setup(shapes["student"], shapes["teacher"])
        except ValueError as exc:
            raise RecipeError(recipe.locate(("losses", i)), str(exc)) from None
        bound.term.to(device)
    return DistillPlan(
        recipe=recipe,
        registry=registry,
        device=device,
        data=data,
        example_inputs=example_inputs,
        student=student,
        student_graph=graphs["student"],
        student_eval_graph=student_eval_graph,
        teacher=teacher,
        teacher_graph=graphs.get("teacher"),
        losses=losses,
        passes=graph_passes,
        contexts=contexts,
    )


def plan_stages(recipe: Recipe, registry: Registry) -> list[tuple[str, DistillPlan]]:
    """A plan per stage, all before anything runs, so a broken stage writes nothing. Stages
    share one student module: each stage's graphs compute with its current weights."""
    plans: list[tuple[str, DistillPlan]] = []
    student = None
    for name, view in recipe.stage_views():
        plan = build_plan(view, registry, student)
        student = plan.student
        plans.append((name, plan))
    return plans


def capture(
    registry: Registry, module: nn.Module, example_inputs: tuple[Any, ...], role: str, method: str
) -> fx.GraphModule:
    gm = registry.pm.hook.compressor_capture(
        module=module, example_inputs=example_inputs, role=role, method=method
    )
    if gm is None:
        raise CaptureError(f"no plugin captured the {role}; is the 'capture' plugin disabled?")
    return gm


def deployable_student(
    registry: Registry,
    student: nn.Module,
    example_inputs: tuple[Any, ...],
    recipe: Recipe,
    passes: list[GraphPass],
    context: PassContext,
) -> fx.GraphModule:
    """The student in eval form with its passes applied, then stripped of all scaffolding.

    Dropout and BatchNorm modes are fixed at capture, so the student is captured a second
    time in eval form. It shares parameters and buffers with the training graph, so it always
    computes with the current weights.
    """
    student.eval()
    try:
        graph = capture(registry, student, example_inputs, "student", recipe.capture.method)
    finally:
        student.train()
    graph = run_passes(graph, passes, context)
    strip = registry.create("graph_pass", "strip", {})
    graph = run_passes(graph, [strip], PassContext("student"))
    if tapped(graph) or any(n.meta.get(SCAFFOLD_META) for n in graph.graph.nodes):
        raise CaptureError("the strip pass left distillation scaffolding in the student graph")
    return graph


def _bind_losses(recipe: Recipe, registry: Registry) -> list[BoundLoss]:
    out: list[BoundLoss] = []
    errors: list[RecipeError] = []
    seen: dict[str, int] = {}
    for i, spec in enumerate(recipe.losses):
        try:
            term = registry.create("loss", spec.name, spec.options, recipe, ("losses", i))
        except RecipeError as exc:
            errors.append(exc)
            continue
        except RecipeErrors as exc:
            errors.extend(exc.errors)
            continue
        count = seen.get(spec.name, 0)
        seen[spec.name] = count + 1
        out.append(
            BoundLoss(spec.name if count == 0 else f"{spec.name}_{count}", spec.weight, term)
        )
    if errors:
        raise RecipeErrors(errors)
    return out


def _bind_passes(
    recipe: Recipe, registry: Registry, role: str, reads: list[str]
) -> list[GraphPass]:
    passes = [registry.create("graph_pass", name, {}, None, ()) for name in DEFAULT_GRAPH_PASSES]
    for i, spec in enumerate(recipe.passes):
        if spec.target not in (role, "both"):
            continue
        graph_pass = registry.create("graph_pass", spec.name, spec.options, recipe, ("passes", i))
        # a recipe entry replaces the default pass of that name (e.g. `tap` with extra nodes)
        passes = [p for p in passes if p.name != graph_pass.name] + [graph_pass]
    # a loss reading an `@name` tap brings the pass that provides it, with default options
    for name in dict.fromkeys(reads):
        if name.startswith(PROVIDED) and not any(name in p.provides_taps for p in passes):
            table = registry.components["graph_pass"].values()
            providers = [p for p in table if name in getattr(p.cls, "provides_taps", ())]
            if providers:
                passes.append(registry.create("graph_pass", providers[0].name, {}))
    return passes


def _load_model(
    recipe: Recipe, registry: Registry, spec: ModelSpec, role: str, seed: int
) -> nn.Module:
    # Seeded per role, so the student starts from the same weights with or without a teacher.
    torch.manual_seed(seed)
    loader: ModelLoader = registry.create(
        "model_loader", spec.loader, {}, recipe, (role,), (role, "loader")
    )
    return loader.load(spec, recipe, (role,))


def _check_taps(
    recipe: Recipe, gm: fx.GraphModule, role: str, losses: list[BoundLoss], passes: list[GraphPass]
) -> None:
    provided = {name for p in passes for name in p.provides_taps}
    for i, bound in enumerate(losses):
        for name in bound.term.reads()[role]:
            if name == OUTPUT or name in provided:
                continue
            if name.startswith(PROVIDED):
                raise RecipeError(
                    recipe.locate(("losses", i, "name")),
                    f"loss {bound.label!r} reads {name!r} from the {role}, and no graph pass provides it",
                )
            try:
                resolve_tap(gm, name)
            except TapNotFound as exc:
                raise RecipeError(
                    recipe.locate(("losses", i, role)),
                    f"tap {name!r} is not a module of the {role} graph{did_you_mean(name, exc.available)}",
                    "output, or a module path: " + ", ".join(exc.available),
                ) from None


def _refresh_shapes(
    gm: fx.GraphModule, example_inputs: tuple[Any, ...], graphs: list[fx.GraphModule | None]
) -> None:
    """symbolic_trace graphs carry example shapes (tensor_meta) that passes may have made
    stale (MAE masking changes the token count): propagate them again. torch.export graphs
    keep symbolic shapes of their own."""
    if any("val" in n.meta for n in gm.graph.nodes) or not isinstance(
        example_inputs[0], torch.Tensor
    ):
        return
    extra = draw_graph_inputs(graphs, example_inputs[0].shape[0], example_inputs[0].device)
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs, *(extra[name] for name in graph_inputs(gm)))


def _shapes(gm: fx.GraphModule, names: list[str]) -> Shapes:
    taps = tapped(gm)
    out: Shapes = {}
    for name in names:
        if name == OUTPUT:
            node = original_output(gm)
            out[name] = node_shape(node) if isinstance(node, fx.Node) else None
        else:
            out[name] = node_shape(taps[name])
    return out
