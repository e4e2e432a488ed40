"""From a validated recipe to a DistillPlan: the one place components are built, models
loaded, captured and passed, losses bound, and every graph rehearsed on a real batch.

Everything that can be wrong with a recipe is found here, before a run folder exists:
unknown components, bad options, models that do not load or capture, taps not in a graph,
and graphs or losses that fail on real data. Later phases (engine, export, measurements,
report) use what the plan holds and build nothing of their own.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import itertools
import json
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_leaves

from compressor import distributed
from compressor.errors import (
    CaptureError,
    CompressorError,
    Problem,
    RecipeError,
    RecipeErrors,
    first_line,
)
from compressor.evaluate import EvalContext, Evaluator
from compressor.export import ExportContext, Exporter
from compressor.graph_pass import (
    OUTPUT,
    PROVIDED,
    SCAFFOLD_META,
    GraphPass,
    PassContext,
    TapNotFound,
    draw_graph_inputs,
    draw_inputs,
    fork,
    graph_input_specs,
    graph_inputs,
    node_shape,
    original_output,
    pass_notes,
    resolve_tap,
    run_passes,
    split_outputs,
    tapped,
)
from compressor.loading import (
    DataBundle,
    DataLoader,
    Inputs,
    ModelLoader,
    batch_size,
    call_model,
    to_device,
)
from compressor.losses import LossInputs, LossTerm, Shapes
from compressor.module_pass import ModulePass, ModulePassContext
from compressor.optim import OptimizerFactory, ScheduleFactory
from compressor.recipe import Recipe, did_you_mean
from compressor.registry import Registry
from compressor.teacher_cache import CacheLayout, TeacherCache
from compressor.yaml_positions import KeyPath

ROLES = ("student", "teacher")
# Passes every plan runs on both graphs, and the one that makes the deployable student; they
# are plugins, looked up by name like any other.
DEFAULT_GRAPH_PASSES = ("tap", "truncate_teacher")
STRIP_PASS = "strip"
# How many training samples the rehearsal runs (and torch.export specialises a batch of 1)
CAPTURE_BATCH = 4


@dataclass
class StepPart:
    """The part of a training step that is running: what to call it in a message, and the
    recipe key that configures it."""

    name: str
    path: KeyPath


@dataclass
class BoundLoss:
    label: str  # the name shown in logs; unique within a plan
    weight: float
    term: LossTerm[Any]
    index: int  # position in the recipe's losses
    part: StepPart = field(init=False)  # what a failure in this term names

    def __post_init__(self) -> None:
        self.part = StepPart(f"loss {self.label!r}", ("losses", self.index))


@dataclass
class BoundExporter:
    label: str  # unique within a plan: two onnx entries are `onnx` and `onnx_1`
    exporter: Exporter[Any]
    index: int  # position in the recipe's export list


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


@dataclass
class DistillPlan:
    recipe: Recipe
    device: torch.device
    data: DataBundle
    example_inputs: tuple[Inputs, ...]
    student: nn.Module
    student_graph: fx.GraphModule  # training form, tapped: what the engine runs
    student_eval_graph: fx.GraphModule  # eval form, stripped: evaluated and exported
    teacher: nn.Module | None
    teacher_graph: fx.GraphModule | None  # eval form, tapped and truncated for the losses
    teacher_eval_graph: fx.GraphModule | None  # eval form, whole: exported and measured
    losses: list[BoundLoss]
    optimizer: OptimizerFactory[Any]
    schedule: ScheduleFactory[Any]
    exporters: list[BoundExporter]
    evaluator: Evaluator[Any]
    hooks: Any  # the plugin manager's hook relay (metrics observers)
    input_specs: dict[str, dict[str, Any]] = field(default_factory=dict)  # inputs passes added
    notes: list[str] = field(default_factory=list)  # what passes chose, for validate
    cache_layout: CacheLayout | None = None  # teacher_cache: what a run's cache keeps
    teacher_from_cache: bool = False  # whether the last step's teacher values were cached
    unreached: int = 0  # trainable parameters no loss reached in the rehearsal (a BERT pooler)
    # set as each part of `loss_terms` starts, so a failure can say which part it was
    part: StepPart = field(default_factory=lambda: StepPart("the training step", ()))

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.student_graph.parameters())
        for bound in self.losses:
            params += list(bound.term.parameters())
        return [p for p in params if p.requires_grad]

    def loss_terms(
        self,
        x: Inputs,
        y: torch.Tensor,
        cache: TeacherCache | None = None,
        indices: Sequence[int] = (),
    ) -> dict[str, torch.Tensor]:
        """One training step's loss terms, unweighted (`backward` applies the weights), on
        batch (x, y) of training samples `indices`, under bf16 autocast on CUDA. With a
        `cache`, the teacher's values come from it when it has them all (`teacher_from_cache`
        says whether they did), and are kept in it when not. If it raises, `self.part` says
        which graph or loss failed."""
        # inputs passes added (MAE's kept patches): one draw shared by both graphs
        extra = (
            draw_inputs(self.input_specs, batch_size(x), self.device) if self.input_specs else {}
        )
        with self._autocast():
            self.part = _STUDENT_PART
            s_out, s_taps = _run(self.student_graph, x, extra)  # logits [B, C], taps
            teacher: dict[str, torch.Tensor] = {}
            self.part = _TEACHER_PART
            cached = cache.lookup(indices, x, self.device) if cache is not None else None
            self.teacher_from_cache = cached is not None
            if cached is not None:
                teacher = cached
            elif self.teacher_graph is not None:
                with torch.no_grad():
                    t_out, t_taps = _run(self.teacher_graph, x, extra)
                    teacher = {OUTPUT: t_out, **t_taps}
                    if cache is not None:
                        teacher = cache.store(indices, x, teacher)
            inputs = LossInputs({OUTPUT: s_out, **s_taps}, teacher, y, x)
            terms = {}
            for bound in self.losses:
                self.part = bound.part
                terms[bound.label] = bound.term(inputs)
        self.part = _BACKWARD_PART  # what the caller does next
        return terms

    def loss_seeds(self) -> list[torch.Tensor]:
        """The losses' weights as tensors on the plan's device, in `losses` order: where each
        term's backward starts (`backward`)."""
        return [torch.tensor(bound.weight, device=self.device) for bound in self.losses]

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        # bf16 on GPUs; on the CPU no context at all rather than a disabled one, which still
        # costs microseconds every step
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", torch.bfloat16)

    def loss_units(self, x: Inputs, y: torch.Tensor | None) -> torch.Tensor:
        """[terms] float64 on the CPU: how many things each loss term averages over on batch
        (x, y) (`LossTerm.units`), to weight the parts of a step split across ranks."""
        return torch.stack(
            [bound.term.units(x, y).detach().double().cpu() for bound in self.losses]
        )

    def verify_inputs(self, batch: int = 64) -> list[tuple[Inputs, ...]]:
        """Eval samples on the CPU, at `batch` and at 1, to check exported artifacts with."""
        cpu = torch.device("cpu")
        n = min(batch, len(self.data.eval))
        full, _ = self.data.batch("eval", range(n), cpu)
        one, _ = self.data.batch("eval", range(1), cpu)
        return [(full,), (one,)]


def backward(terms: Sequence[torch.Tensor], seeds: Sequence[torch.Tensor]) -> None:
    """The gradient of sum(seed * term), without a multiplication and a sum in the autograd
    graph (ops that cost a small model's step a few percent): each term's backward starts
    from its seed. A term that reaches no trained parameter (a constant) adds nothing to it;
    autograd refuses those as starting points."""
    roots = [(t, s) for t, s in zip(terms, seeds, strict=True) if t.requires_grad]
    if not roots:
        raise RuntimeError("no loss term depends on a trained parameter")
    torch.autograd.backward([t for t, _ in roots], grad_tensors=[s for _, s in roots])


_STUDENT_PART = StepPart("the student's training graph", ("student",))
_TEACHER_PART = StepPart("the teacher's graph", ("teacher",))
_BACKWARD_PART = StepPart("the backward pass", ("losses",))


def _run(
    gm: fx.GraphModule, x: Inputs, extra: dict[str, torch.Tensor]
) -> tuple[Any, dict[str, torch.Tensor]]:
    if extra:  # only the inputs this graph takes
        return split_outputs(gm, call_model(gm, x, **{n: extra[n] for n in graph_inputs(gm)}))
    return split_outputs(gm, call_model(gm, x))


def select_device(recipe: Recipe) -> torch.device:
    """The recipe's device; under torchrun on GPUs, this rank's own GPU."""
    if recipe.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError(recipe.locate(("device",)), "no CUDA GPU is visible", "auto, cpu")
    if recipe.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    world = distributed.current()
    return torch.device("cuda", world.local_rank) if world.size > 1 else torch.device("cuda")


def build_plan(recipe: Recipe, registry: Registry, student: nn.Module | None = None) -> DistillPlan:
    """Validate and prepare a run. Raises RecipeError(s), PluginError or CaptureError.

    `student` continues a student from an earlier stage: it is used as it is, without
    loading or module passes."""
    components = build_components(recipe, registry, load_student=student is None)
    _report(recipe, registry.pm.hook.compressor_validate_recipe(recipe=recipe))
    device = select_device(recipe)
    data = load_data(recipe, components.data_loader)
    module_notes = _repeated_passes(recipe)
    teacher, student = load_models(recipe, components, student, device, data, module_notes)
    _choose_trainable(recipe, student, module_notes)
    _report(
        recipe,
        registry.pm.hook.compressor_validate_models(
            recipe=recipe, teacher=teacher, student=student, data=data
        ),
    )
    for bound in components.exporters:
        _check_exporter(recipe, bound, student, device)

    # torch.export specialises a batch of 1, so capture with a few samples
    example_inputs = (data.batch("train", range(min(CAPTURE_BATCH, len(data.train))), device)[0],)
    graphs = capture_graphs(recipe, registry, components, student, teacher, example_inputs)
    _setup_losses(recipe, components.losses, graphs, device)
    evaluator = _build_evaluator(recipe, registry, data, teacher, device)
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
        input_specs=graph_input_specs([graphs["student"], graphs.get("teacher")]),
        notes=module_notes
        + [
            f"{role}: {note}"
            for role in ROLES
            if role in graphs
            for note in pass_notes(graphs[role])
        ],
    )
    plan.cache_layout = _cache_layout(recipe, plan)
    rehearse(plan)
    return plan


def _cache_layout(recipe: Recipe, plan: DistillPlan) -> CacheLayout | None:
    """What `teacher_cache` keeps, or None without one; a cache that cannot hold is an error."""
    spec = recipe.teacher_cache
    if spec is None:
        return None
    where = recipe.locate(("teacher_cache",), prefer_key=True)
    if distributed.launched():
        raise RecipeError(
            where,
            "teacher_cache keeps one process's cache and is not available under torchrun",
            "remove teacher_cache, or run in one process",
        )
    if plan.teacher_graph is None:
        if recipe.stages is not None:  # a stage without a teacher has nothing to cache
            return None
        raise RecipeError(where, "teacher_cache is set, but no loss reads the teacher")
    if plan.input_specs:
        raise RecipeError(
            where,
            "the teacher's outputs depend on inputs drawn anew at every step "
            f"({', '.join(plan.input_specs)}), so they cannot be cached",
            "teacher_cache only with graphs that add no random inputs (no mae_mask)",
        )
    if spec.top_k is not None:
        _check_sparse_readers(recipe, plan.losses)
    taps = tapped(plan.teacher_graph)
    shapes = _shapes(plan.teacher_graph, list(taps))
    node = original_output(plan.teacher_graph)
    shapes[OUTPUT] = node_shape(node) if isinstance(node, fx.Node) else None
    constants = {  # taps of parameters (a fused head's weight): kept once, not per sample
        name: operator.attrgetter(str(tap.target))(plan.teacher_graph)
        for name, tap in taps.items()
        if tap.op == "get_attr"
    }
    sequence_dims = {
        name: tuple(d for d, size in enumerate(shape) if d > 0 and not isinstance(size, int))
        for name, shape in shapes.items()
        if shape is not None
    }
    top_k = spec.top_k

    def compress(teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for bound in plan.losses:
            if top_k is not None:
                teacher, added = bound.term.cached_teacher(teacher, top_k)
                sequence_dims.update(added)
        return teacher

    fingerprint = json.dumps(
        {
            "teacher": recipe.teacher.model_dump() if recipe.teacher else None,
            # every module pass: a student's pass may change what the teacher returns too
            # (prune_vocab reads a causal-LM teacher's logits over the kept tokens)
            "module_passes": [p.model_dump() for p in recipe.module_passes],
            "data": recipe.data.model_dump(),
            "losses": [loss.model_dump() for loss in recipe.losses],
            "teacher_cache": spec.model_dump(),
        },
        sort_keys=True,
        default=str,
    )
    return CacheLayout(sequence_dims, compress, int(spec.memory_mb * 2**20), constants, fingerprint)


def _check_sparse_readers(recipe: Recipe, losses: list[BoundLoss]) -> None:
    """top_k hands the teacher's logits to the terms that keep them sparse; no other term
    may read them."""
    sparse = [b for b in losses if type(b.term).cached_teacher is not LossTerm.cached_teacher]
    if not sparse:
        raise RecipeError(
            recipe.locate(("teacher_cache", "top_k"), prefer_key=True),
            "top_k keeps the teacher's logits as sparse targets, and no loss here reads them so",
            "a kd loss, or teacher_cache without top_k",
        )
    if len(sparse) > 1:
        raise RecipeError(
            recipe.locate(("losses", sparse[1].index)),
            f"losses {', '.join(repr(b.label) for b in sparse)} would each keep sparse "
            "targets of the teacher, and teacher_cache.top_k keeps one set",
            "one kd loss with teacher_cache.top_k, or teacher_cache without top_k",
        )
    for bound in sparse:
        taken = set(bound.term.reads()["teacher"])
        for other in losses:
            shared = taken & set(other.term.reads()["teacher"])
            if other is not bound and shared:
                raise RecipeError(
                    recipe.locate(("losses", other.index)),
                    f"loss {other.label!r} reads the teacher's {', '.join(sorted(shared))}, "
                    f"which teacher_cache.top_k keeps only as loss {bound.label!r}'s sparse "
                    "targets",
                    "teacher_cache without top_k, or one loss reading the teacher's logits",
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


# -- components ---------------------------------------------------------------------------------
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


def _report(recipe: Recipe, found: list[list[str | Problem] | None]) -> None:
    """Problems from check hooks as located recipe errors."""
    errors = []
    for problems in found:
        for problem in problems or []:
            if isinstance(problem, Problem):
                where = recipe.locate(problem.path)
                errors.append(RecipeError(where, problem.message, problem.allowed))
            else:
                errors.append(RecipeError(recipe.locate(()), str(problem)))
    if errors:
        raise RecipeErrors(errors)


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
            _check_finite_weights(recipe, role, module)
    student.to(device).train()
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    return teacher, student


def _repeated_passes(recipe: Recipe) -> list[str]:
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


def _check_finite_weights(recipe: Recipe, role: str, module: nn.Module) -> None:
    """NaN or infinite weights would stop the run at its first step: say so now, and where."""
    tensors = itertools.chain(module.named_parameters(), module.named_buffers())
    bad = [
        (name, int((~torch.isfinite(t)).sum()))
        for name, t in tensors
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        shown = ", ".join(f"{name} ({n})" for name, n in bad[:3])
        more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
        raise RecipeError(
            recipe.locate((role,)),
            f"the {role}'s weights hold values that are not finite (NaN or inf): {shown}{more}",
            "finite weights: check the checkpoint the loader reads",
        )


def _check_exporter(
    recipe: Recipe, bound: BoundExporter, student: nn.Module, device: torch.device
) -> None:
    try:
        bound.exporter.check(student, device)
    except ValueError as exc:
        raise RecipeError(recipe.locate(("export", bound.index, "name")), str(exc)) from None


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
        _check_taps(recipe, gm, role, components.losses, components.passes_for(role))
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


def _check_taps(
    recipe: Recipe,
    gm: fx.GraphModule,
    role: str,
    losses: list[BoundLoss],
    passes: list[GraphPass[Any]],
) -> None:
    provided = {name for p in passes for name in p.provides_taps}
    for bound in losses:
        for name in bound.term.reads()[role]:
            if name == OUTPUT or name in provided:
                continue
            if name.startswith(PROVIDED):
                raise RecipeError(
                    recipe.locate(("losses", bound.index, "name")),
                    f"loss {bound.label!r} reads {name!r} from the {role}, and no graph pass provides it",
                )
            try:
                resolve_tap(gm, name)
            except TapNotFound as exc:
                raise RecipeError(
                    recipe.locate(("losses", bound.index, role)),
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


# -- losses -------------------------------------------------------------------------------------
def _setup_losses(
    recipe: Recipe, losses: list[BoundLoss], graphs: dict[str, fx.GraphModule], device: torch.device
) -> None:
    for bound in losses:
        reads = bound.term.reads()
        shapes = {
            role: _shapes(graphs[role], reads[role]) if role in graphs else {} for role in ROLES
        }
        try:
            bound.term.setup(shapes["student"], shapes["teacher"])
        except ValueError as exc:
            raise RecipeError(recipe.locate(("losses", bound.index)), str(exc)) from None
        bound.term.to(device)


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


# -- rehearsal ----------------------------------------------------------------------------------
def rehearse(plan: DistillPlan) -> None:
    """Run every graph on real data in each form it will run in, so what would fail at step
    1, at the first evaluation or at export fails here, located, before a run folder exists:
    the eval-form student at an eval batch and at batch 1 (the export checks), the whole
    teacher, and one training step's losses and gradients (no optimizer step); outputs and
    losses that are not finite are errors too. Nothing the
    rehearsal touches survives it: BatchNorm statistics, gradients and the RNG are restored."""
    recipe = plan.recipe
    modules = [plan.student_graph, *(b.term for b in plan.losses)]
    buffers = [(t, t.detach().clone()) for m in modules for t in m.buffers()]
    rng = torch.get_rng_state()
    n = min(recipe.data.batch_size, len(plan.data.train))
    x, y = plan.data.batch("train", range(n), plan.device)
    try:
        # eval forms first: a teacher that gives NaN is named as such, not as a NaN loss
        evaluated = [
            (
                StepPart("the student's eval and export graph", ("student",)),
                plan.student_eval_graph,
            ),
            (StepPart("the teacher's whole graph", ("teacher",)), plan.teacher_eval_graph),
        ]
        with torch.no_grad():
            for inputs in plan.verify_inputs(min(recipe.data.eval_batch_size, 8)):
                batch = inputs[0]
                for part, gm in evaluated:
                    if gm is not None:
                        plan.part = part
                        with _located(plan, f"an eval batch of {batch_size(batch)}"):
                            out = call_model(gm, to_device(batch, plan.device))
                        _check_finite_outputs(plan, part, out, batch_size(batch))
        # with a teacher cache, through it: the losses then read what later epochs will
        cache = TeacherCache(plan.cache_layout) if plan.cache_layout is not None else None
        with _located(plan, f"one training batch of {n}"):
            terms = plan.loss_terms(x, y, cache, range(n))
        for bound in plan.losses:
            value = terms[bound.label]
            _check_scalar(plan, bound, value, n)
            if not bool(torch.isfinite(value).all()):
                raise RecipeError(
                    recipe.locate(bound.part.path),
                    f"loss {bound.label!r} is {value.detach().float().cpu().tolist()} on the "
                    f"first training batch of {n}: training would stop at step 1",
                )
        with _located(plan, f"one training batch of {n}"):
            backward(list(terms.values()), plan.loss_seeds())
        plan.unreached = sum(p.grad is None for p in plan.trainable_parameters())
    finally:
        for p in plan.trainable_parameters():
            p.grad = None
        for tensor, saved in buffers:
            tensor.copy_(saved)
        torch.set_rng_state(rng)


def _check_scalar(plan: DistillPlan, bound: BoundLoss, value: Any, batch: int) -> None:
    """A loss gives one number; anything else fails later in backward, naming no loss."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point():
        return
    got = (
        f"a {value.dtype} tensor of shape {list(value.shape)}"
        if isinstance(value, torch.Tensor)
        else f"a {type(value).__name__}"
    )
    raise RecipeError(
        plan.recipe.locate(bound.part.path),
        f"loss {bound.label!r} returned {got} on one training batch of {batch}",
        "a loss's forward returns a 0-dim floating-point tensor: reduce it (.mean(), .sum())",
    )


def _check_finite_outputs(plan: DistillPlan, part: StepPart, out: Any, batch: int) -> None:
    leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    bad = sum(int((~torch.isfinite(t)).sum()) for t in leaves)
    if bad:
        total = sum(t.numel() for t in leaves)
        raise RecipeError(
            plan.recipe.locate(part.path),
            f"{part.name} gives {bad} values that are not finite (of {total}) on a real eval "
            f"batch of {batch}",
        )


@contextlib.contextmanager
def _located(plan: DistillPlan, on: str) -> Iterator[None]:
    """A failure inside becomes a recipe error at the key of the part that failed."""
    try:
        yield
    except CompressorError:
        raise
    except Exception as exc:
        failed = plan.part
        raise RecipeError(
            plan.recipe.locate(failed.path), f"{failed.name} fails on {on}: {first_line(exc)}"
        ) from exc
