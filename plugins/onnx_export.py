"""ONNX export through torch's dynamo exporter, verified in onnxruntime."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import fx, nn
from torch.export import Dim

from compressor.api import (
    OUTPUT_NAME_META,
    Exporter,
    ExportError,
    ExportResult,
    Inputs,
    Runner,
    batch_size,
    call_model,
    hookimpl,
    to_device,
)


class ONNXOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    opset: int | None = Field(None, ge=18, description="ONNX opset; default: the exporter's")
    tolerance: float = Field(1e-4, gt=0, description="max abs difference allowed vs PyTorch")


class ONNXExporter(Exporter[ONNXOptions]):
    """ONNX (dynamo exporter, dynamic batch axis), checked against PyTorch in onnxruntime."""

    name = "onnx"

    def export(
        self,
        graph: fx.GraphModule,
        example_inputs: tuple[Inputs, ...],
        verify_inputs: list[tuple[Inputs, ...]],
        out_dir: Path,
        stem: str,
        module: nn.Module | None = None,
    ) -> ExportResult:
        path = out_dir / f"{stem}.onnx"
        names = export_onnx(graph, example_inputs, path, self.options.opset)
        diff = verify_onnx(graph, path, verify_inputs)
        details = {
            "verified_batches": [batch_size(b[0]) for b in verify_inputs],
            "inputs": names,
        }
        return ExportResult(self.name, path, diff, self.options.tolerance, details)

    def runner(self, path: Path, providers: list[str] | None = None) -> Runner | None:
        return ort_runner(path, providers)


def ort_runner(path: Path, providers: list[str] | None = None) -> Runner:
    """An ONNX file in an onnxruntime session, run on PyTorch-style inputs."""
    session = ort_session(path, providers)
    names = [i.name for i in session.get_inputs()]
    return lambda inputs: session.run(None, ort_feeds(names, inputs))


def export_onnx(
    graph: fx.GraphModule, example_inputs: tuple[Inputs, ...], path: Path, opset: int | None
) -> list[str]:
    """Write `graph` as one ONNX file with dynamic batch (and sequence, for named text
    inputs) axes; inputs keep the graph's argument names, the output the model's own name.
    Returns the input names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [n.name for n in graph.graph.nodes if n.op == "placeholder"]
    batch = Dim("batch")
    placed = [to_device(x, graph_device(graph)) for x in example_inputs]
    args: tuple[Any, ...] = tuple(placed)
    kwargs: dict[str, Any] = {}
    dynamic: Any = tuple({0: batch} for _ in args)
    if len(placed) == 1 and isinstance(placed[0], dict):
        args, kwargs = (), placed[0]
        dynamic = {
            k: {0: batch, 1: Dim.AUTO} if v.dim() >= 2 else {0: batch} for k, v in kwargs.items()
        }
    # the exporter logs a warning per optional torchvision op it cannot find
    with quiet("torch.onnx"):
        torch.onnx.export(
            graph,
            args,
            str(path),
            kwargs=kwargs,
            dynamo=True,
            dynamic_shapes=dynamic,
            input_names=names,
            output_names=[graph.meta.get(OUTPUT_NAME_META, "logits")],
            opset_version=opset,
            # one file when it fits protobuf's 2 GiB limit; weights beside it when not
            external_data=state_bytes(graph) > 1.5 * 2**30,
            verbose=False,
        )
    return names


def graph_device(graph: fx.GraphModule) -> torch.device:
    """Where a graph's weights are: it is exported and checked there, never moved."""
    for tensor in (*graph.parameters(), *graph.buffers()):
        return tensor.device
    return torch.device("cpu")


def state_bytes(graph: fx.GraphModule) -> int:
    return sum(t.numel() * t.element_size() for t in graph.state_dict().values())


def verify_onnx(
    graph: fx.GraphModule, path: Path, verify_inputs: list[tuple[Inputs, ...]]
) -> float:
    """Max abs difference between onnxruntime and PyTorch over `verify_inputs`."""
    session = ort_session(path)
    names = [i.name for i in session.get_inputs()]
    diffs = []
    for batch_inputs in verify_inputs:
        got = session.run(None, ort_feeds(names, batch_inputs))[0]
        with torch.no_grad():
            here = [to_device(x, graph_device(graph)) for x in batch_inputs]
            want = (
                (call_model(graph, here[0]) if isinstance(here[0], dict) else graph(*here))
                .float()
                .cpu()
                .numpy()
            )
        if got.shape != want.shape:
            raise ExportError(
                f"{path}: onnxruntime output shape {got.shape} != PyTorch {want.shape}"
            )
        diffs.append(float(np.abs(got - want).max()))
    return max(diffs)


def ort_feeds(names: list[str], inputs: tuple[Inputs, ...]) -> dict[str, Any]:
    if len(inputs) == 1 and isinstance(inputs[0], dict):
        return {name: inputs[0][name].cpu().numpy() for name in names}
    return {name: x.cpu().numpy() for name, x in zip(names, inputs, strict=True)}  # type: ignore[union-attr]


@contextlib.contextmanager
def quiet(*loggers: str, stderr: bool = False) -> Iterator[None]:
    """Export and quantization tools print, warn and log a lot; what they produce is checked
    instead. While inside: warnings off, stdout (with `stderr`, stderr too) swallowed, the
    named loggers ("" is the root) at ERROR."""
    named = [logging.getLogger(name or None) for name in loggers]
    levels = [logger.level for logger in named]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for logger in named:
            logger.setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stderr(io.StringIO()) if stderr else contextlib.nullcontext():
                yield
        finally:
            for logger, level in zip(named, levels, strict=True):
                logger.setLevel(level)


def ort_session(path: Path, providers: list[str] | None = None) -> Any:
    """An onnxruntime session on `providers`; by default CUDA when onnxruntime-gpu has it,
    else CPU, never TensorRT's provider, which would build an engine on every session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if providers is None:
        wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
        providers = [p for p in wanted if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), options, providers=providers)


@hookimpl
def compressor_exporters() -> list[type]:
    return [ONNXExporter]
