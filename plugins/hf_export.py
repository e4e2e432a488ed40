"""`hf`: a Hugging Face model folder that optimum.onnxruntime loads like any HF ONNX export.

The folder holds `model.onnx` (inputs named like the HF forward's arguments, output named
as HF does: `last_hidden_state` or `logits`, dynamic batch and sequence axes),
`config.json`, the tokenizer files, and the PyTorch weights (`model.safetensors`), so it is
also a transformers model folder: a later recipe can load it as a teacher. It is verified
twice: in onnxruntime directly, and through optimum's ORTModel class for the task.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from compressor.capture import OUTPUT_NAME_META
from compressor.errors import ExportError
from compressor.export import ExportResult
from compressor.hookspecs import hookimpl
from compressor.loading import Inputs, batch_size, call_model, to_device
from compressor.plugins.hf import TASKS, HFModule
from compressor.plugins.onnx_export import ONNXExporter, export_onnx, verify_onnx


class HFExporter(ONNXExporter):
    """ONNX in a Hugging Face folder (config, tokenizer, weights), checked in optimum."""

    name = "hf"

    def check(self, module: nn.Module, device: torch.device) -> None:
        if not isinstance(module, HFModule):
            raise ValueError(
                f"exporter 'hf' writes Hugging Face folders, and the student is a "
                f"{type(module).__name__}, not a model loaded with loader: hf"
            )

    def export(
        self,
        graph: fx.GraphModule,
        example_inputs: tuple[Inputs, ...],
        verify_inputs: list[tuple[Inputs, ...]],
        out_dir: Path,
        stem: str,
        module: nn.Module | None = None,
    ) -> ExportResult:
        if not isinstance(module, HFModule):
            raise ExportError(
                f"exporter 'hf' writes Hugging Face folders; the {stem} is a "
                f"{type(module).__name__}, not a model loaded with loader: hf. Use exporter 'onnx'."
            )
        folder = out_dir / f"{stem}-hf"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "model.onnx"
        names = export_onnx(graph, example_inputs, path, self.options.opset)
        module.hf_model.save_pretrained(str(folder), safe_serialization=True)
        if module.tokenizer is not None:
            module.tokenizer.save_pretrained(str(folder))
        diff = verify_onnx(graph, path, verify_inputs)
        details: dict[str, Any] = {
            "folder": str(folder),
            "verified_batches": [batch_size(b[0]) for b in verify_inputs],
            "inputs": names,
            "onnxruntime_max_abs_diff": diff,
        }
        optimum_diff, how = _optimum_check(folder, module.task, graph, verify_inputs)
        details["optimum"] = how
        if optimum_diff is not None:
            details["optimum_max_abs_diff"] = optimum_diff
            diff = max(diff, optimum_diff)
        return ExportResult(self.name, path, diff, self.options.tolerance, details)


def _optimum_check(
    folder: Path, task: str, graph: fx.GraphModule, verify_inputs: list[tuple[Inputs, ...]]
) -> tuple[float | None, str]:
    """Load the folder with optimum's ORTModel class for `task` and compare with PyTorch."""
    try:
        import optimum.onnxruntime as ort_models
    except ImportError as exc:
        return None, f"not checked: optimum.onnxruntime is not installed ({exc})"
    cls_name = TASKS[task][2]
    options: dict[str, Any] = (
        {"use_cache": False, "use_io_binding": False} if task == "causal-lm" else {}
    )
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        model = getattr(ort_models, cls_name).from_pretrained(
            str(folder), file_name="model.onnx", local_files_only=True, **options
        )
    diffs = []
    for inputs in verify_inputs:
        x = to_device(inputs[0], torch.device("cpu"))
        assert isinstance(x, dict)
        with torch.no_grad():
            got = getattr(model(**x), graph.meta.get(OUTPUT_NAME_META, "logits"))
            want = call_model(graph, x).float()
        got = torch.as_tensor(np.asarray(got)).float()
        if got.shape != want.shape:
            raise ExportError(
                f"{folder}: {cls_name} output shape {tuple(got.shape)} != PyTorch {tuple(want.shape)}"
            )
        diffs.append(float((got - want).abs().max()))
    return max(diffs), f"loaded with optimum.onnxruntime.{cls_name}"


@hookimpl
def compressor_exporters() -> list[type]:
    return [HFExporter]
