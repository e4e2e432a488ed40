"""Module passes: `nn.Module -> nn.Module`, run before capture (e.g. building a student)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from compressor.components import Component, OptionsT


@dataclass
class ModulePassContext:
    role: str
    teacher: nn.Module | None


class ModulePass(Component[OptionsT]):
    """Rewrites a model before capture and returns it (or a new one); raise ValueError for a
    model it cannot rewrite (a located recipe error at the pass)."""

    def __call__(self, module: nn.Module, context: ModulePassContext) -> nn.Module:
        raise NotImplementedError
