"""Evaluation: what "better" means for the data's task, computed by an evaluator plugin.

The data loader names its task (`DataBundle.task`); the plan builds the evaluator of that
name once, `setup` gives it the eval data and the teacher (an embedding evaluator scores
students against the teacher's embeddings), and the engine, the stages and the measurements
call it on the student's eval-form graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx, nn

from compressor.components import Component, OptionsT
from compressor.loading import DataBundle
from compressor.world import SOLO, World


@dataclass
class EvalContext:
    data: DataBundle
    batch_size: int
    device: torch.device
    teacher: nn.Module | None  # frozen, eval form; None when no loss reads it


class Evaluator(Component[OptionsT]):
    """Metrics of a model on `context.data.eval`; `name` is the task it scores.

    `primary` names the metric that says better or worse (`higher_is_better` which way), and
    `chance()` its value for a model that learned nothing, so a run can warn when its student
    ends worse than it started or at chance."""

    context: EvalContext
    # the ranks this evaluation is shared among (training under torchrun): `batch_starts`
    # spreads the eval batches, and `shard.sum` / `shard.gather` combine what each rank scored
    shard: World = SOLO
    primary: ClassVar[str | None] = None
    higher_is_better: ClassVar[bool] = True

    def chance(self) -> float | None:
        """The primary metric of a model that learned nothing (None: not known)."""
        return None

    def warnings(self, before: dict[str, float], after: dict[str, float]) -> list[str]:
        """What a user must know before shipping a student that scored `after`, having started
        at `before`: worse than it started, or no better than chance."""
        key = self.primary
        if key is None or key not in after:
            return []
        sign = 1.0 if self.higher_is_better else -1.0
        out = []
        if key in before and sign * (after[key] - before[key]) < 0:
            out.append(
                f"the student ends worse than it started: {key} {after[key]:.4g} after "
                f"training, {before[key]:.4g} before"
            )
        chance = self.chance()
        if chance is not None and sign * (after[key] - chance) <= 0.01 * max(1.0, abs(chance)):
            out.append(
                f"the student is at chance level: {key} {after[key]:.4g}, where a model that "
                f"learned nothing scores {chance:.4g}"
            )
        return out

    def setup(self, context: EvalContext) -> None:
        """Called once per plan before any evaluation."""
        self.context = context

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of `model` (an eval-form graph, or a module in eval mode) under no_grad.
        May return {} when the model has nothing this task can score."""
        raise NotImplementedError

    def batch_starts(self) -> list[int]:
        """The first eval sample of each eval batch this rank scores."""
        return self.shard.mine(list(range(0, len(self.context.data.eval), self.context.batch_size)))

    def batch(self, start: int) -> tuple[Any, torch.Tensor]:
        """The eval batch from sample `start`, on the evaluation device."""
        c = self.context
        end = min(start + c.batch_size, len(c.data.eval))
        return c.data.batch("eval", range(start, end), c.device)

    def __call__(self, model: nn.Module, shard: World = SOLO) -> dict[str, float]:
        """Metrics of `model`; with a `shard` of several ranks, every rank must call it (each
        scores its part of the eval set) and all get the same metrics."""
        was_training = model.training
        if not isinstance(model, fx.GraphModule):  # exported graphs have their mode baked in
            model.eval()
        self.shard = shard
        try:
            with torch.no_grad():
                return self.evaluate(model)
        finally:
            self.shard = SOLO
            if not isinstance(model, fx.GraphModule):
                model.train(was_training)
