"""What the plan checks before a run folder exists, each failure a recipe error at the key
of the part that failed: problems plugins' check hooks report, weights that are not
finite, exporters that cannot export the model, taps no graph has, and the rehearsal:
every graph of a built plan run once on real data, in each form it will run in, so what
would fail at step 1, at the first evaluation or at export fails while the plan is built."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from compressor.errors import (
    CompressorError,
    Problem,
    RecipeError,
    RecipeErrors,
    first_line,
)
from compressor.export import BoundExporter
from compressor.graph_pass import OUTPUT, PROVIDED, GraphPass, TapNotFound, resolve_tap
from compressor.loading import batch_size, call_model, to_device
from compressor.losses import BoundLoss, StepPart
from compressor.recipe import Recipe, did_you_mean
from compressor.step import BACKWARD_PART, DistillPlan, StepFailed, backward
from compressor.teacher_cache import TeacherCache


def report_problems(recipe: Recipe, found: list[list[str | Problem] | None]) -> None:
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


def check_finite_weights(recipe: Recipe, role: str, module: nn.Module) -> None:
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


def check_exporter(
    recipe: Recipe, bound: BoundExporter, student: nn.Module, device: torch.device
) -> None:
    try:
        bound.exporter.check(student, device)
    except ValueError as exc:
        raise RecipeError(recipe.locate(("export", bound.index, "name")), str(exc)) from None


def check_taps(
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


def rehearse(plan: DistillPlan) -> int:
    """Run every graph on real data in each form it will run in, so what would fail at step
    1, at the first evaluation or at export fails here, located, before a run folder exists:
    the eval-form student at an eval batch and at batch 1 (the export checks), the whole
    teacher, and one training step's losses and gradients (no optimizer step); outputs and
    losses that are not finite are errors too. Nothing the rehearsal touches survives it:
    BatchNorm statistics, gradients and the RNG are restored. Returns how many trainable
    parameters no loss reached (a BERT pooler under an embedding loss)."""
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
                        with _located(plan, part, f"an eval batch of {batch_size(batch)}"):
                            out = call_model(gm, to_device(batch, plan.device))
                        _check_finite_outputs(plan, part, out, batch_size(batch))
        # with a teacher cache, through it: the losses then read what later epochs will
        cache = TeacherCache(plan.cache_layout) if plan.cache_layout is not None else None
        with _located(plan, BACKWARD_PART, f"one training batch of {n}"):
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
        with _located(plan, BACKWARD_PART, f"one training batch of {n}"):
            backward(list(terms.values()), plan.loss_seeds())
        return sum(p.grad is None for p in plan.trainable_parameters())
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
def _located(plan: DistillPlan, part: StepPart, on: str) -> Iterator[None]:
    """A failure inside becomes a recipe error at the key of the part that failed: `part`,
    or the part of the step a `StepFailed` names."""
    try:
        yield
    except CompressorError:
        raise
    except StepFailed as exc:
        raise _at(plan, exc.part, on, exc.cause) from exc.cause
    except Exception as exc:
        raise _at(plan, part, on, exc) from exc


def _at(plan: DistillPlan, part: StepPart, on: str, cause: BaseException) -> RecipeError:
    return RecipeError(
        plan.recipe.locate(part.path), f"{part.name} fails on {on}: {first_line(cause)}"
    )
