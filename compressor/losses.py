"""Loss terms: each reads named outputs of the student and teacher graphs.

A term names what it reads (`output` or a module path tap) so the plan can tap the graphs
and truncate the teacher. Terms are nn.Modules: learned pieces (feature projections) are
trained with the student and, living outside the student graph, never reach the export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from compressor.components import Component, OptionsT
from compressor.loading import batch_size
from compressor.yaml_positions import KeyPath

Shapes = dict[str, tuple[Any, ...] | None]


@dataclass
class LossInputs:
    student: dict[str, torch.Tensor]
    teacher: dict[str, torch.Tensor]
    target: torch.Tensor | None
    # the batch the models saw: a tensor, or named tensors (`attention_mask` masks padding)
    batch: Any = None


class LossTerm(Component[OptionsT], nn.Module):
    """A term of the training loss. `reads` names what it needs from each graph; the plan taps
    those, calls `setup` once with their captured shapes (make learned pieces there), and the
    engine calls `forward` every step with the values (`LossInputs`)."""

    needs_teacher: ClassVar[bool] = True
    default_weight: ClassVar[float] = 1.0  # the weight when the recipe gives none

    def __init__(self, options: OptionsT | None = None):
        nn.Module.__init__(self)
        Component.__init__(self, options)

    def reads(self) -> dict[str, list[str]]:
        """Names read from each graph, keyed by role: `output` (the model's own output), a
        module path (`features.4`, `encoder.layer.2.attention.self:softmax`) or a tap a pass
        provides (`@ofa`)."""
        return {"student": ["output"], "teacher": ["output"] if self.needs_teacher else []}

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        """Called once with the captured shapes of what `reads` names, before training; raise
        ValueError for shapes the term cannot take (a located recipe error)."""

    def cached_teacher(
        self, teacher: dict[str, torch.Tensor], top_k: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
        """With `teacher_cache.top_k`: the teacher's values as the cache should keep them (a
        term reading logits may swap them for sparse targets), and for each value it adds,
        the dims (counting the batch dim) that follow the token count. Default: unchanged."""
        return teacher, {}

    def units(self, batch: Any, target: torch.Tensor | None) -> torch.Tensor:
        """How many things the term's value is a mean over on this batch: its samples, unless
        the term averages over tokens (then the tokens it scores). A step split across ranks
        or micro-batches weights each part by its share of these, so the parts add up to the
        value on the whole batch."""
        return torch.tensor(float(batch_size(batch)))

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        raise NotImplementedError

    def observed(self) -> dict[str, float]:
        """What the term measured on its last training batch, beyond its value (an MoE
        block's expert load), logged at every evaluation as `<label>/<name>` and shown in
        the report. Called rarely, so it may read values back from the device. Default: {}."""
        return {}


@dataclass(frozen=True)
class StepPart:
    """The part of a training step that is running: what to call it in a message, and the
    recipe key that configures it."""

    name: str
    path: KeyPath


@dataclass
class BoundLoss:
    """A recipe's loss entry in a plan: its term, weight, label and where the recipe has it."""

    label: str  # the name shown in logs; unique within a plan
    weight: float
    term: LossTerm[Any]
    index: int  # position in the recipe's losses
    part: StepPart = field(init=False)  # what a failure in this term names

    def __post_init__(self) -> None:
        self.part = StepPart(f"loss {self.label!r}", ("losses", self.index))
