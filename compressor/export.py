"""Exporters turn the stripped student graph into a deployable artifact and verify it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from compressor.components import Component, OptionsT
from compressor.loading import Inputs


@dataclass
class ExportResult:
    exporter: str  # the exporter's name
    path: Path
    max_abs_diff: float
    tolerance: float
    details: dict[str, Any] = field(default_factory=dict)
    label: str = ""  # unique within a run (`onnx`, `onnx_1`); set by the export step

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


class Exporter(Component[OptionsT]):
    """Writes a deployable artifact of a graph and verifies it against PyTorch."""

    def check(self, module: nn.Module, device: torch.device) -> None:
        """Raise ValueError if this exporter cannot export `module` here (checked when the
        plan is built, so `compress validate` says so before any training)."""

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


@dataclass
class Artifact:
    """One exported file of a run: whose it is, which recipe entry made it, its check."""

    role: str  # student (what is shipped) or teacher (exported to compare against)
    label: str
    exporter: Exporter[Any]
    result: ExportResult
