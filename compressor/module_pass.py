"""Module passes: `nn.Module -> nn.Module`, run before capture (e.g. building a student)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.components import Component, OptionsT
from compressor.loading import DataBundle


@dataclass
class ModulePassContext:
    """What a module pass may draw on: the role it rewrites, the teacher, the recipe's data
    (calibration batches of `batch_size`), `notes` for what it chose (shown by validate
    and in the report), and the recipe's `folder`."""

    role: str
    teacher: nn.Module | None
    data: DataBundle | None = None
    batch_size: int = 32
    notes: list[str] = field(default_factory=list)
    folder: Path = Path()  # the recipe's folder: files named in options are relative to it

    def training_batches(
        self, count: int, who: str, device: torch.device | None = None
    ) -> list[Any]:
        """The inputs of the first `count` training batches of `batch_size`, for a pass that
        measures the model (on the CPU unless `device`); `who` names the pass in the error."""
        if self.data is None or len(self.data.train) == 0:
            raise ValueError(f"{who} measures the model on the training data; there is none")
        size = min(self.batch_size, len(self.data.train))
        starts = range(0, min(count * size, len(self.data.train)), size)
        return [
            self.data.batch(
                "train",
                range(start, min(start + size, len(self.data.train))),
                device or torch.device("cpu"),
            )[0]
            for start in starts
        ]


class ModulePass(Component[OptionsT]):
    """Rewrites a model before capture and returns it (or a new one); raise ValueError for a
    model it cannot rewrite (a located recipe error at the pass)."""

    def __call__(self, module: nn.Module, context: ModulePassContext) -> nn.Module:
        raise NotImplementedError
