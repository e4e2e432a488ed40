"""Module passes: `nn.Module -> nn.Module`, run before capture (e.g. building a student)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from compressor.components import Component


@dataclass
class ModulePassContext:
    role: str
    teacher: nn.Module | None


class ModulePass(Component):
    kind: ClassVar[str] = "module_pass"

    def __call__(self, module: nn.Module, context: ModulePassContext) -> nn.Module:
        raise NotImplementedError
