"""Exporters turn the stripped student graph into a deployable artifact and verify it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from compressor.components import Component, OptionsT
from compressor.evaluate import Evaluator
from compressor.loading import DataBundle, Inputs

# a loaded model or artifact: runs once on the given inputs (see Exporter.runner)
Runner = Callable[[tuple[Inputs, ...]], object]


@dataclass
class ExportResult:
    """What an exporter wrote and how it was checked: outputs against PyTorch (max abs
    difference within `tolerance`) and, for lossy artifacts (int8), the task metric
    against the fp32 model (`drop` in the primary metric's units, within `max_drop`)."""

    exporter: str  # the exporter's name
    path: Path
    max_abs_diff: float
    tolerance: float
    details: dict[str, Any] = field(default_factory=dict)
    label: str = ""  # unique within a run (`onnx`, `onnx_1`); set by the export step
    drop: float | None = None
    max_drop: float | None = None

    @property
    def ok(self) -> bool:
        within = self.max_abs_diff <= self.tolerance
        return within and (self.drop is None or self.max_drop is None or self.drop <= self.max_drop)

    def failure(self) -> str:
        """Why the artifact failed its check, in one line."""
        if self.drop is not None and self.max_drop is not None and self.drop > self.max_drop:
            metric = self.details.get("metric", "the metric")
            return (
                f"{self.label} export {self.path} loses {self.drop:.3g} {metric} against the fp32 "
                f"model (max_drop {self.max_drop:.3g})"
            )
        return (
            f"{self.label} export {self.path} differs from PyTorch by {self.max_abs_diff:.3g} "
            f"(tolerance {self.tolerance:.3g})"
        )


@dataclass
class ExportContext:
    """What an exporter may draw on besides the graph: the recipe's data (calibration
    batches), the task's evaluator (verification by metric) and the plan's device."""

    data: DataBundle
    batch_size: int
    device: torch.device
    evaluator: Evaluator[Any]


class Exporter(Component[OptionsT]):
    """Writes a deployable artifact of a graph and verifies it against PyTorch."""

    context: ExportContext

    def setup(self, context: ExportContext) -> None:
        """Called once per plan, before any export."""
        self.context = context

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

    def runner(self, path: Path, providers: list[str] | None = None) -> Runner | None:
        """The artifact at `path` loaded to run here: a function that runs it once on the
        given inputs (the data's, as PyTorch gets them), returning when its outputs are
        ready; None when it cannot run here. `providers`: onnxruntime's execution providers
        to run an ONNX artifact on (`compress bench` times each); None: the exporter's
        choice. The report times every model's runner in interleaved rounds, so each is
        measured under the same machine load."""
        return None

    def generation_rate(self, path: Path, prompt: Inputs, new_tokens: int) -> float | None:
        """New tokens per second of greedy generation from `prompt` (one row) for an artifact
        that generates (a causal LM with a KV cache); None for any other."""
        return None


@dataclass
class Artifact:
    """One exported file of a run: whose it is, which recipe entry made it, its check."""

    role: str  # student (what is shipped) or teacher (exported to compare against)
    label: str
    exporter: Exporter[Any]
    result: ExportResult


@dataclass
class BoundExporter:
    """A recipe's export entry in a plan."""

    label: str  # unique within a plan: two onnx entries are `onnx` and `onnx_1`
    exporter: Exporter[Any]
    index: int  # position in the recipe's export list


def export_check(entry: dict[str, Any]) -> str:
    """How an artifact was verified, in words: its metric against fp32 for lossy artifacts,
    its max abs difference to PyTorch otherwise."""
    if entry.get("drop") is not None:
        metric = entry["metric"]
        return (
            f"{metric} {entry['int8'][metric]:.4f} against fp32 {entry['fp32'][metric]:.4f} "
            f"(drop {entry['drop']:.4f}, max_drop {entry['max_drop']:.4f})"
        )
    return f"max abs diff {entry['max_abs_diff']:.3g} (tolerance {entry['tolerance']:.3g})"
