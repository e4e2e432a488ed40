"""Optimizer and learning-rate schedule components."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch

from compressor.components import Component


class OptimizerFactory(Component):
    kind: ClassVar[str] = "optimizer"

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        raise NotImplementedError


class ScheduleFactory(Component):
    kind: ClassVar[str] = "schedule"

    def factor(self, step: int, total_steps: int) -> float:
        """Multiplier of the base learning rate at `step` (0-based)."""
        raise NotImplementedError

    def build(
        self, optimizer: torch.optim.Optimizer, total_steps: int
    ) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.factor(step, total_steps)
        )
