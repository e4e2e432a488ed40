"""Module passes: `nn.Module -> nn.Module`, run before capture (e.g. building a student)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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


class ModulePass(Component[OptionsT]):
    """Rewrites a model before capture and returns it (or a new one); raise ValueError for a
    model it cannot rewrite (a located recipe error at the pass)."""

    def __call__(self, module: nn.Module, context: ModulePassContext) -> nn.Module:
        raise NotImplementedError
