"""int8 ONNX for CPUs through onnxruntime's quantization, verified by the task metric.

The fp32 graph is exported as the `onnx` exporter does, pre-processed (shape inference and
onnxruntime's graph optimisations; for transformer graphs first onnxruntime's transformer
fusions), then quantized:

- static (QDQ): weights per channel int8, activations uint8 with ranges calibrated on
  batches of the recipe's training data; the usual choice for convolutional and MLP models;
- dynamic: int8 weights (embedding tables included), activation ranges computed per call;
  the usual choice for transformers on CPUs, where it avoids calibrating attention.

`auto` picks dynamic for named text inputs (token ids) and static otherwise. The artifact is
checked on the eval set by the task's own metric: the drop against the fp32 graph must stay
within `max_drop` (in the primary metric's units: accuracy, Spearman, loss).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import fx, nn

from compressor.api import Exporter, ExportResult, Inputs, Runner, batch_size, hookimpl
from compressor.plugins.onnx_export import (
    export_onnx,
    ort_feeds,
    ort_runner,
    ort_session,
    quiet,
    state_bytes,
    verify_onnx,
)


class Int8Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["auto", "static", "dynamic"] = "auto"
    max_drop: float = Field(
        0.005, ge=0, description="largest allowed loss of the task's primary metric vs fp32"
    )
    calibration_batches: int = Field(8, gt=0, description="static: training batches to calibrate")
    per_channel: bool = True
    optimize: Literal["auto", "none"] = Field(
        "auto", description="auto: onnxruntime's transformer fusions for text models"
    )
    opset: int | None = Field(None, ge=18)


class ONNXInt8Exporter(Exporter[Int8Options]):
    """int8 ONNX (onnxruntime quantization, static QDQ or dynamic), checked by the task metric."""

    name = "onnx_int8"

    def export(
        self,
        graph: fx.GraphModule,
        example_inputs: tuple[Inputs, ...],
        verify_inputs: list[tuple[Inputs, ...]],
        out_dir: Path,
        stem: str,
        module: nn.Module | None = None,
    ) -> ExportResult:
        return self.write_int8(graph, example_inputs, verify_inputs, out_dir / f"{stem}.int8.onnx")

    def write_int8(
        self,
        graph: fx.GraphModule,
        example_inputs: tuple[Inputs, ...],
        verify_inputs: list[tuple[Inputs, ...]],
        path: Path,
        own_ids: torch.Tensor | None = None,
    ) -> ExportResult:
        """Quantize `graph` into `path` and score it against the fp32 graph. `own_ids` maps
        the data's token ids to those `graph` reads (a pruned vocabulary's; the inputs given
        here are already in them): calibration and scoring feed the data through it."""
        o = self.options
        path.parent.mkdir(parents=True, exist_ok=True)
        text = isinstance(example_inputs[0], dict)
        mode = o.mode if o.mode != "auto" else ("dynamic" if text else "static")
        details: dict[str, Any] = {"mode": mode}
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = Path(tmp) / "fp32.onnx"
            export_onnx(graph, example_inputs, fp32, o.opset)
            if o.optimize == "auto" and text:
                fp32, details["fusions"] = _transformer_fusions(fp32, Path(tmp))
            prepared = _preprocess(fp32, Path(tmp) / "prepared.onnx")
            with quiet(""):
                if mode == "static":
                    feeds = self._calibration(graph, own_ids)
                    _quantize_static(prepared, path, feeds, o.per_channel)
                else:
                    _quantize_dynamic(prepared, path, o.per_channel)
        diff = verify_onnx(graph, path, verify_inputs)  # shown, not checked: int8 is lossy
        evaluator = self.context.evaluator
        metric = evaluator.primary
        fp32_scores = evaluator(fed_data_ids(graph, own_ids))
        int8_scores = evaluator(fed_data_ids(OrtModule(path), own_ids))
        details |= {
            "verified_batches": [batch_size(b[0]) for b in verify_inputs],
            "metric": metric,
            "fp32": fp32_scores,
            "int8": int8_scores,
            "fp32_bytes": state_bytes(graph),
        }
        drop = None
        if metric is not None and metric in fp32_scores and metric in int8_scores:
            sign = 1.0 if evaluator.higher_is_better else -1.0
            drop = sign * (fp32_scores[metric] - int8_scores[metric])
        return ExportResult(
            self.name, path, diff, float("inf"), details, drop=drop, max_drop=o.max_drop
        )

    def runner(self, path: Path, providers: list[str] | None = None) -> Runner | None:
        return ort_runner(path, providers)

    def _calibration(
        self, graph: fx.GraphModule, own_ids: torch.Tensor | None
    ) -> list[dict[str, np.ndarray]]:
        """Feeds of the first training batches (the same data the student learned from)."""
        c = self.context
        names = [n.name for n in graph.graph.nodes if n.op == "placeholder"]
        n = len(c.data.train)
        size = min(c.batch_size, n)
        feeds = []
        for start in range(0, min(n, size * self.options.calibration_batches), size):
            x, _ = c.data.batch("train", range(start, min(start + size, n)), torch.device("cpu"))
            feeds.append(ort_feeds(names, (map_ids(x, own_ids),)))
        return feeds


class OrtModule(nn.Module):
    """An onnxruntime session as a module, so the task's evaluator scores the artifact
    exactly as it scores the PyTorch graph."""

    def __init__(self, path: Path):
        super().__init__()
        self.session = ort_session(path)
        self.names = [i.name for i in self.session.get_inputs()]

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        inputs: tuple[Inputs, ...] = (kwargs,) if kwargs else args
        device = next(iter(kwargs.values())).device if kwargs else args[0].device
        out = self.session.run(None, ort_feeds(self.names, inputs))[0]
        return torch.from_numpy(out).to(device)


def fed_data_ids(model: nn.Module, own_ids: torch.Tensor | None) -> nn.Module:
    """`model`, which reads a pruned vocabulary's token ids, as a model fed the data's
    (`own_ids[i]` is its id for the data's id i); without a map, `model` itself."""
    return model if own_ids is None else _ReadsOwnIds(model, own_ids)


class _ReadsOwnIds(nn.Module):
    def __init__(self, model: nn.Module, own_ids: torch.Tensor):
        super().__init__()
        self.model, self.own_ids = model, own_ids
        self.training = model.training  # evaluation restores this mode to both

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**map_ids(inputs, self.own_ids))  # type: ignore[arg-type]


def map_ids(x: Inputs, own_ids: torch.Tensor | None) -> Inputs:
    """Text inputs with their `input_ids` looked up in `own_ids`; anything else as it is."""
    if own_ids is None or not isinstance(x, dict):
        return x
    return {**x, "input_ids": own_ids.to(x["input_ids"].device)[x["input_ids"]]}


def _transformer_fusions(path: Path, tmp: Path) -> tuple[Path, dict[str, int]]:
    """onnxruntime's BERT-style fusions (attention, layer norm, GELU) where they match;
    the model unchanged, and no fusions listed, where they do not."""
    from onnxruntime.transformers.optimizer import optimize_model

    with quiet(""):
        model = optimize_model(str(path), model_type="bert", num_heads=0, hidden_size=0)
    fused = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    out = tmp / "fused.onnx"
    model.save_model_to_file(str(out))
    return out, fused


def _preprocess(path: Path, out: Path) -> Path:
    """Shape inference and graph optimisation, as onnxruntime advises before quantizing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # when symbolic shape inference gives up, onnxruntime saves its partial model, weights
    # and all, into the working directory: keep that inside our temporary folder
    with quiet(""), contextlib.chdir(out.parent):
        try:
            quant_pre_process(str(path), str(out))
        except Exception:  # symbolic shape inference fails on some graphs: skip only that
            quant_pre_process(str(path), str(out), skip_symbolic_shape=True)
    return out


def _quantize_static(
    path: Path, out: Path, feeds: list[dict[str, np.ndarray]], per_channel: bool
) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(
        str(path),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def _quantize_dynamic(path: Path, out: Path, per_channel: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(path), str(out), per_channel=per_channel, weight_type=QuantType.QInt8)


@hookimpl
def compressor_exporters() -> list[type]:
    return [ONNXInt8Exporter]
