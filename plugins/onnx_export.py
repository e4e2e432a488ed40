"""ONNX export through torch's dynamo exporter, verified in onnxruntime."""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import fx
from torch.export import Dim

from compressor.errors import ExportError
from compressor.export import Exporter, ExportResult
from compressor.hookspecs import hookimpl


class ONNXOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    opset: int | None = Field(None, ge=18, description="ONNX opset; default: the exporter's")
    tolerance: float = Field(1e-4, gt=0, description="max abs difference allowed vs PyTorch")


class ONNXExporter(Exporter):
    """ONNX (dynamo exporter, dynamic batch axis), checked against PyTorch in onnxruntime."""

    name = "onnx"
    Options = ONNXOptions

    def export(
        self,
        graph: fx.GraphModule,
        example_inputs: tuple[torch.Tensor, ...],
        verify_inputs: list[tuple[torch.Tensor, ...]],
        out_dir: Path,
        stem: str,
    ) -> ExportResult:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{stem}.onnx"
        names = [n.name for n in graph.graph.nodes if n.op == "placeholder"]
        batch = Dim("batch")
        inputs = tuple(x.cpu() for x in example_inputs)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            _quiet_torch_onnx(),
        ):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph.cpu(),  # export runs after training; artifacts are built on the CPU
                inputs,
                str(path),
                dynamo=True,
                dynamic_shapes=tuple({0: batch} for _ in inputs),
                input_names=names,
                output_names=["logits"],
                opset_version=self.options.opset,
                external_data=False,
                verbose=False,
            )
        session = _session(path)
        diffs = []
        for batch_inputs in verify_inputs:
            feeds = {name: x.cpu().numpy() for name, x in zip(names, batch_inputs, strict=True)}
            got = session.run(None, feeds)[0]
            with torch.no_grad():
                want = graph(*(x.cpu() for x in batch_inputs)).float().numpy()
            if got.shape != want.shape:
                raise ExportError(
                    f"{path}: onnxruntime output shape {got.shape} != PyTorch {want.shape}"
                )
            diffs.append(float(np.abs(got - want).max()))
        result = ExportResult(
            self.name,
            path,
            max(diffs),
            self.options.tolerance,
            {"verified_batches": [int(b[0].shape[0]) for b in verify_inputs], "inputs": names},
        )
        return result

    def latency(self, path: Path, inputs: tuple[torch.Tensor, ...], repeats: int) -> float | None:
        session = _session(path)
        names = [i.name for i in session.get_inputs()]
        feeds = {name: x.cpu().numpy() for name, x in zip(names, inputs, strict=True)}
        for _ in range(3):
            session.run(None, feeds)
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - began)
        return statistics.median(times)


@contextlib.contextmanager
def _quiet_torch_onnx() -> Iterator[None]:
    """The exporter logs a warning per optional torchvision op it cannot find; not our concern."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _session(path: Path):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # CUDA when onnxruntime-gpu has it, else CPU; never TensorRT's provider, which would
    # build an engine on every session.
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
    providers = [p for p in wanted if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), options, providers=providers)


@hookimpl
def compressor_exporters() -> list[type]:
    return [ONNXExporter]
