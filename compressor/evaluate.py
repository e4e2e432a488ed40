"""Evaluation: what "better" means for the data's task, computed by an evaluator plugin.

The data loader names its task (`DataBundle.task`); the plan builds the evaluator of that
name once, `setup` gives it the eval data and the teacher (an embedding evaluator scores
students against the teacher's embeddings), and the engine, the stages and the measurements
call it on the student's eval-form graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from compressor.components import Component, OptionsT
from compressor.loading import DataBundle


@dataclass
class EvalContext:
    data: DataBundle
    batch_size: int
    device: torch.device
    teacher: nn.Module | None  # frozen, eval form; None when no loss reads it


class Evaluator(Component[OptionsT]):
    """Metrics of a model on `context.data.eval`; `name` is the task it scores."""

    context: EvalContext

    def setup(self, context: EvalContext) -> None:
        """Called once per plan before any evaluation."""
        self.context = context

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of `model` (an eval-form graph, or a module in eval mode) under no_grad.
        May return {} when the model has nothing this task can score."""
        raise NotImplementedError

    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        if not isinstance(model, fx.GraphModule):  # exported graphs have their mode baked in
            model.eval()
        try:
            with torch.no_grad():
                return self.evaluate(model)
        finally:
            if not isinstance(model, fx.GraphModule):
                model.train(was_training)
