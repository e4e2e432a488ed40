"""From a validated recipe to a DistillPlan: the one place components are built, models
loaded, captured and passed, losses bound, and every graph rehearsed on a real batch.

Everything that can be wrong with a recipe is found here, before a run folder exists:
unknown components, bad options, models that do not load or capture, taps not in a graph,
and graphs or losses that fail on real data. Later phases (engine, export, measurements,
report) use what the plan holds and build nothing of their own.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from compressor.checks import (
    check_exporter,
    check_finite_weights,
    check_taps,
    rehearse,
    report_problems,
)
from compressor.errors import CaptureError, PluginError, RecipeError
from compressor.evaluate import EvalContext, Evaluator
from compressor.export import ExportContext
from compressor.graph_pass import (
    OUTPUT,
    SCAFFOLD_META,
    PassContext,
    draw_graph_inputs,
    fork,
    graph_input_specs,
    graph_inputs,
    pass_notes,
    run_passes,
    tap_shapes,
    tapped,
)
from compressor.loading import (
    DataBundle,
    DataLoader,
    Inputs,
)
from compressor.losses import BoundLoss
from compressor.module_pass import ModulePassContext
from compressor.recipe import Recipe
from compressor.recipe_chain import Chain, finished_run
from compressor.recipe_components import (
    ROLES,
    Components,
    build_components,
    repeated_passes,
)
from compressor.registry import Registry
from compressor.step import DistillPlan
from compressor.teacher_cache import cache_layout
from compressor.world import current

# How many training samples the rehearsal runs (and torch.export specialises a batch of 1)
CAPTURE_BATCH = 4


def select_device(recipe: Recipe) -> torch.device:
    """The recipe's device; under torchrun on GPUs, this rank's own GPU."""
    if recipe.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError(recipe.locate(("device",)), "no CUDA GPU is visible", "auto, cpu")
    if recipe.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    world = current()
    return torch.device("cuda", world.local_rank) if world.size > 1 else torch.device("cuda")


def build_plan(
    recipe: Recipe,
    registry: Registry,
    student: nn.Module | None = None,
    chain: ChainModels | None = None,
) -> DistillPlan:
    """Validate and prepare a run. Raises RecipeError(s), PluginError or CaptureError.

    `student` continues a student from an earlier stage: it is used as it is, without
    loading or module passes. `chain` is the recipes models come from (resolved here when
    not given; a recipe not yet run is then an error)."""
    chain = chain or ChainModels(Chain(recipe, registry), registry)
    components = build_components(recipe, registry, load_student=student is None)
    for loader in components.model_loaders.values():
        loader.chain = chain
    report_problems(recipe, registry.pm.hook.compressor_validate_recipe(recipe=recipe))
    device = select_device(recipe)
    data = load_data(recipe, components.data_loader)
    module_notes = repeated_passes(recipe)
    teacher, student = load_models(recipe, components, student, device, data, module_notes)
    _choose_trainable(recipe, student, module_notes)
    report_problems(
        recipe,
        registry.pm.hook.compressor_validate_models(
            recipe=recipe, teacher=teacher, student=student, data=data
        ),
    )
    for bound in components.exporters:
        check_exporter(recipe, bound, student, device)

    # torch.export specialises a batch of 1, so capture with a few samples
    example_inputs = (data.batch("train", range(min(CAPTURE_BATCH, len(data.train))), device)[0],)
    graphs = capture_graphs(recipe, registry, components, student, teacher, example_inputs)
    _setup_losses(recipe, components.losses, graphs, device)
    evaluator = _build_evaluator(recipe, registry, data, teacher, device)
    input_specs = graph_input_specs([graphs["student"], graphs.get("teacher")])
    for bound in components.exporters:
        bound.exporter.setup(ExportContext(data, recipe.data.eval_batch_size, device, evaluator))
    plan = DistillPlan(
        recipe=recipe,
        device=device,
        data=data,
        example_inputs=example_inputs,
        student=student,
        student_graph=graphs["student"],
        student_eval_graph=graphs["student_eval"],
        teacher=teacher,
        teacher_graph=graphs.get("teacher"),
        teacher_eval_graph=graphs.get("teacher_eval"),
        losses=components.losses,
        optimizer=components.optimizer,
        schedule=components.schedule,
        exporters=components.exporters,
        evaluator=evaluator,
        hooks=registry.pm.hook,
        input_specs=input_specs,
        notes=module_notes
        + [
            f"{role}: {note}"
            for role in ROLES
            if role in graphs
            for note in pass_notes(graphs[role])
        ],
        cache_layout=cache_layout(recipe, graphs.get("teacher"), components.losses, input_specs),
    )
    return dataclasses.replace(plan, unreached=rehearse(plan))


def plan_stages(
    recipe: Recipe, registry: Registry, chain: Chain | None = None, untrained_ok: bool = False
) -> list[tuple[str, DistillPlan]]:
    """A plan per stage, all before anything runs, so a broken stage writes nothing. Stages
    share one student module: each stage's graphs compute with its current weights.
    `untrained_ok` (validate, graph): a model from a recipe not yet run is its untrained
    student."""
    models = ChainModels(chain or Chain(recipe, registry), registry, untrained_ok)
    plans: list[tuple[str, DistillPlan]] = []
    student = None
    for name, view in recipe.stage_views():
        plan = build_plan(view, registry, student, models)
        student = plan.student
        plans.append((name, plan))
    return plans


class ChainModels:
    """The chain's recipes as model loaders see them (`compressor.loading.RecipeModels`)."""

    def __init__(self, chain: Chain, registry: Registry, untrained_ok: bool = False):
        self.chain, self.registry, self.untrained_ok = chain, registry, untrained_ok

    def finished_run(self, file: Path) -> Path | None:
        return finished_run(self._recipe(file))

    def student(self, file: Path) -> nn.Module:
        view = self._recipe(file).stage_views()[0][1]  # stages share the first one's student
        components = build_components(view, self.registry)
        for loader in components.model_loaders.values():
            loader.chain = self
        data = load_data(view, components.data_loader) if view.module_passes else None
        _, student = load_models(view, components, None, torch.device("cpu"), data)
        return student

    def _recipe(self, file: Path) -> Recipe:
        recipe = self.chain.recipe(file)
        if recipe is None:
            raise PluginError(
                f"a model loader asked for the run of {file}, which its recipes() did not name"
            )
        return recipe


# -- data and models ----------------------------------------------------------------------------
def load_data(recipe: Recipe, loader: DataLoader[Any]) -> DataBundle:
    data = loader.load(recipe.data, recipe)
    if len(data.train) == 0 or len(data.eval) == 0:
        raise RecipeError(
            recipe.locate(("data",)), "the data loader returned an empty train or eval set"
        )
    if recipe.data.group_by_length and data.lengths() is None:
        raise RecipeError(
            recipe.locate(("data", "group_by_length"), prefer_key=True),
            f"group_by_length needs a length for every item, and the {recipe.data.loader!r} "
            "loader's items have no attention_mask to count it from",
            "group_by_length with text loaders (items with an attention_mask), or leave it out",
        )
    return data


def load_models(
    recipe: Recipe,
    components: Components,
    student: nn.Module | None,
    device: torch.device,
    data: DataBundle | None = None,
    notes: list[str] | None = None,
) -> tuple[nn.Module | None, nn.Module]:
    """(teacher or None when no loss reads it, student): loaded, module-passed, and put in
    their forms: the student training, the teacher frozen in eval form."""
    needs_teacher = any(b.term.reads()["teacher"] for b in components.losses)
    copies_teacher = student is None and recipe.student.from_teacher
    if copies_teacher and recipe.teacher is None:
        raise RecipeError(
            recipe.locate(("student", "from_teacher"), prefer_key=True),
            "student.from_teacher is set, but the recipe has no teacher to copy",
        )
    if needs_teacher and recipe.teacher is None:
        first = next(b for b in components.losses if b.term.reads()["teacher"])
        raise RecipeError(
            recipe.locate(("losses", first.index, "name")),
            f"loss {first.label!r} reads the teacher, but the recipe has no teacher",
            "add a teacher: section, or use only losses that need no teacher (ce)",
        )
    teacher = None
    if needs_teacher or copies_teacher:
        # seeded per role, so the student starts alike with or without a teacher
        torch.manual_seed(recipe.seed)
        teacher = components.model_loaders["teacher"].load(recipe, ("teacher",))
    if student is None:
        if copies_teacher:
            student = copy.deepcopy(teacher)
        else:
            torch.manual_seed(recipe.seed + 1)
            student = components.model_loaders["student"].load(recipe, ("student",))
        assert student is not None
        student, teacher = _run_module_passes(recipe, components, student, teacher, data, notes)
    if not needs_teacher:
        teacher = None
    for role, module in (("teacher", teacher), ("student", student)):
        if module is not None:
            check_finite_weights(recipe, role, module)
    student.to(device).train()
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    return teacher, student


def _run_module_passes(
    recipe: Recipe,
    components: Components,
    student: nn.Module,
    teacher: nn.Module | None,
    data: DataBundle | None,
    notes: list[str] | None,
) -> tuple[nn.Module, nn.Module | None]:
    """Every module pass entry in recipe order, on each role its `target` names (`both`: the
    teacher, then the student); a teacher pass with no teacher loaded has nothing to rewrite."""
    for i, target, module_pass in components.module_passes:
        for role in ("teacher", "student") if target == "both" else (target,):
            model = student if role == "student" else teacher
            if model is None:
                continue
            context = ModulePassContext(
                role, teacher, data, recipe.data.batch_size, folder=recipe.resolve(".")
            )
            try:
                model = module_pass(model, context)
            except ValueError as exc:
                raise RecipeError(recipe.locate(("module_passes", i)), str(exc)) from None
            if role == "student":
                student = model
            else:
                teacher = model
            if notes is not None:
                notes += [f"{role}: {note}" for note in context.notes]
    return student, teacher


def _choose_trainable(recipe: Recipe, student: nn.Module, notes: list[str]) -> None:
    """Train the student parameters `train.trainable` matches (all without it)."""
    patterns = recipe.train.trainable
    named = list(student.named_parameters())
    if patterns is None:
        for _, p in named:
            p.requires_grad_(True)
        return
    for i, pattern in enumerate(patterns):
        if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in named):
            raise RecipeError(
                recipe.locate(("train", "trainable", i)),
                f"pattern {pattern!r} matches no student parameter",
                "glob patterns over names such as " + ", ".join(n for n, _ in named[:4]),
            )
    trained = 0
    for name, p in named:
        p.requires_grad_(any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns))
        trained += p.numel() if p.requires_grad else 0
    total = sum(p.numel() for _, p in named)
    notes.append(f"train.trainable: {trained:,} of {total:,} student parameters are trained")


def _build_evaluator(
    recipe: Recipe,
    registry: Registry,
    data: DataBundle,
    teacher: nn.Module | None,
    device: torch.device,
) -> Evaluator[Any]:
    if data.task not in registry.components["evaluator"]:
        raise RecipeError(
            recipe.locate(("data", "loader")),
            f"the data loader's task is {data.task!r}, and no evaluator plugin scores it",
            "tasks with an evaluator: " + ", ".join(registry.names("evaluator")),
        )
    evaluator: Evaluator[Any] = registry.create("evaluator", data.task, {})
    evaluator.setup(EvalContext(data, recipe.data.eval_batch_size, device, teacher))
    return evaluator


# -- graphs -------------------------------------------------------------------------------------
def capture(
    registry: Registry, module: nn.Module, example_inputs: tuple[Any, ...], role: str, method: str
) -> fx.GraphModule:
    gm = registry.pm.hook.compressor_capture(
        module=module, example_inputs=example_inputs, role=role, method=method
    )
    if gm is None:
        raise CaptureError(f"no plugin captured the {role}; is the 'capture' plugin disabled?")
    return gm


def capture_graphs(
    recipe: Recipe,
    registry: Registry,
    components: Components,
    student: nn.Module,
    teacher: nn.Module | None,
    example_inputs: tuple[Inputs, ...],
) -> dict[str, fx.GraphModule]:
    """The graphs a run uses: `student` (training form, tapped), `student_eval` (eval form,
    passes applied, stripped), and with a teacher `teacher` (tapped, truncated) and
    `teacher_eval` (whole, for export and measurement), sharing one capture."""
    method = recipe.capture.method
    reads = {role: [n for b in components.losses for n in b.term.reads()[role]] for role in ROLES}
    captured = {"student": capture(registry, student, example_inputs, "student", method)}
    if teacher is not None:
        captured["teacher"] = capture(registry, teacher, example_inputs, "teacher", method)
    for role, gm in captured.items():
        check_taps(recipe, gm, role, components.losses, components.passes_for(role))
    contexts = {
        role: PassContext(
            role,
            [n for n in dict.fromkeys(reads[role]) if n != OUTPUT],
            OUTPUT in reads[role],
            peer=captured.get("teacher" if role == "student" else "student"),
        )
        for role in ROLES
    }
    graphs: dict[str, fx.GraphModule] = {}
    if teacher is not None:
        graphs["teacher_eval"] = fork(captured["teacher"])  # before the passes rewrite it
    for role, gm in captured.items():
        graphs[role] = run_passes(gm, components.passes_for(role), contexts[role])
    for role in captured:
        _refresh_shapes(graphs[role], example_inputs, [graphs["student"], graphs.get("teacher")])

    # Dropout and BatchNorm modes are fixed at capture, so the student is captured again in
    # eval form; it shares parameters with the training graph, so it always computes with
    # the current weights.
    student.eval()
    try:
        eval_graph = capture(registry, student, example_inputs, "student", method)
    finally:
        student.train()
    eval_context = dataclasses.replace(contexts["student"], training=False)
    eval_graph = run_passes(eval_graph, components.passes_for("student"), eval_context)
    eval_graph = run_passes(eval_graph, [components.strip], PassContext("student"))
    if tapped(eval_graph) or any(n.meta.get(SCAFFOLD_META) for n in eval_graph.graph.nodes):
        raise CaptureError("the strip pass left distillation scaffolding in the student graph")
    graphs["student_eval"] = eval_graph
    return graphs


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


# -- losses -------------------------------------------------------------------------------------
def _setup_losses(
    recipe: Recipe, losses: list[BoundLoss], graphs: dict[str, fx.GraphModule], device: torch.device
) -> None:
    for bound in losses:
        reads = bound.term.reads()
        shapes = {
            role: tap_shapes(graphs[role], reads[role]) if role in graphs else {} for role in ROLES
        }
        try:
            bound.term.setup(shapes["student"], shapes["teacher"])
        except ValueError as exc:
            raise RecipeError(recipe.locate(("losses", bound.index)), str(exc)) from None
        bound.term.to(device)
