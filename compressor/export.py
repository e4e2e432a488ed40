"""Exporters turn the stripped student graph into a deployable artifact and verify it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import fx, nn

from compressor.components import Component
from compressor.loading import Inputs


@dataclass
class ExportResult:
    exporter: str
    path: Path
    max_abs_diff: float
    tolerance: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


class Exporter(Component):
    kind: ClassVar[str] = "exporter"

    def export(
        self,
        graph: fx.GraphModule,
        example_inputs: tuple[Inputs, ...],
        verify_inputs: list[tuple[Inputs, ...]],
        out_dir: Path,
        stem: str,
        module: nn.Module | None = None,
    ) -> ExportResult:
        """Write `graph` under `out_dir` and report its max abs difference to `graph` itself run
        by PyTorch over `verify_inputs`. `module` is the model the graph was captured from,
        for exporters that also write its configuration (Hugging Face folders)."""
        raise NotImplementedError

    def latency(self, path: Path, inputs: tuple[Inputs, ...], repeats: int) -> float | None:
        """Median seconds per call of the exported artifact, or None if not measurable here."""
        return None
