"""Optimizer and learning-rate schedule components."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from compressor.components import Component, OptionsT


class OptimizerFactory(Component[OptionsT]):
    """Builds the optimizer over the trainable parameters (student and learned loss pieces)."""

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        raise NotImplementedError


class ScheduleFactory(Component[OptionsT]):
    """A learning-rate multiplier per step; `build` wraps it in a LambdaLR."""

    def factor(self, step: int, total_steps: int) -> float:
        """Multiplier of the base learning rate at `step` (0-based)."""
        raise NotImplementedError

    def constant(self) -> bool:
        """True when the factor is 1 at every step: the engine then never steps the schedule
        (a LambdaLR step is host work a small model's step notices)."""
        return False

    def build(
        self, optimizer: torch.optim.Optimizer, total_steps: int
    ) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.factor(step, total_steps)
        )
