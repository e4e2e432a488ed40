"""Built-in capture: torch.export (non-strict, dynamic batch), falling back to symbolic_trace."""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from compressor.api import capture_module, hookimpl


@hookimpl(trylast=True)
def compressor_capture(
    module: nn.Module, example_inputs: tuple[Any, ...], role: str, method: str
) -> fx.GraphModule:
    return capture_module(module, example_inputs, role, method)
