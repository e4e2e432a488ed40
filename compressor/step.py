"""One training step: the plan a run is built into, its forward (`DistillPlan.loss_terms`)
and backward (`backward`), which the engine, the distributed wrappers and the rehearsal run.

The plan is made by `compressor.plan`; this module only runs what it holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from compressor.errors import CompressorError
from compressor.evaluate import Evaluator
from compressor.export import BoundExporter
from compressor.graph_pass import OUTPUT, draw_inputs, graph_inputs, split_outputs
from compressor.loading import DataBundle, Inputs, batch_size, call_model
from compressor.losses import BoundLoss, LossInputs, StepPart
from compressor.optim import OptimizerFactory, ScheduleFactory
from compressor.recipe import Recipe
from compressor.teacher_cache import CacheLayout, TeacherCache


@dataclass(frozen=True)
class DistillPlan:
    """Everything a run uses, built and checked once by `compressor.plan.build_plan` and not
    changed afterwards; `loss_terms` is one training step's forward."""

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
    unreached: int = 0  # trainable parameters no loss reached in the rehearsal (a BERT pooler)

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
        `cache`, the teacher's values come from it when it has them all (`cache.last_hit`
        says whether they did), and are kept in it when not. A failure inside is a
        `StepFailed` naming the graph or loss that raised."""
        # inputs passes added (MAE's kept patches): one draw shared by both graphs
        extra = (
            draw_inputs(self.input_specs, batch_size(x), self.device) if self.input_specs else {}
        )
        part = STUDENT_PART
        try:
            with self._autocast():
                s_out, s_taps = _run(self.student_graph, x, extra)  # logits [B, C], taps
                part = TEACHER_PART
                teacher = self._teacher(x, extra, cache, indices)
                inputs = LossInputs({OUTPUT: s_out, **s_taps}, teacher, y, x)
                terms = {}
                for bound in self.losses:
                    part = bound.part
                    terms[bound.label] = bound.term(inputs)
        except CompressorError:
            raise
        except Exception as exc:
            raise StepFailed(part, exc) from exc
        return terms

    def _teacher(
        self,
        x: Inputs,
        extra: dict[str, torch.Tensor],
        cache: TeacherCache | None,
        indices: Sequence[int],
    ) -> dict[str, torch.Tensor]:
        """The teacher's values the losses read: from the cache when it holds the batch."""
        cached = cache.lookup(indices, x, self.device) if cache is not None else None
        if cached is not None:
            return cached
        if self.teacher_graph is None:
            return {}
        with torch.no_grad():
            t_out, t_taps = _run(self.teacher_graph, x, extra)
            teacher = {OUTPUT: t_out, **t_taps}
            return cache.store(indices, x, teacher) if cache is not None else teacher

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


STUDENT_PART = StepPart("the student's training graph", ("student",))
TEACHER_PART = StepPart("the teacher's graph", ("teacher",))
BACKWARD_PART = StepPart("the backward pass", ("losses",))


class StepFailed(Exception):
    """A part of a training step raised (a graph, a loss): which part, and the cause."""

    def __init__(self, part: StepPart, cause: BaseException):
        super().__init__(f"{part.name}: {cause}")
        self.part = part
        self.cause = cause


def _run(
    gm: fx.GraphModule, x: Inputs, extra: dict[str, torch.Tensor]
) -> tuple[Any, dict[str, torch.Tensor]]:
    if extra:  # only the inputs this graph takes
        return split_outputs(gm, call_model(gm, x, **{n: extra[n] for n in graph_inputs(gm)}))
    return split_outputs(gm, call_model(gm, x))
