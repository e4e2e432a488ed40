"""Capture an nn.Module into a torch.fx GraphModule with a dynamic batch dimension.

The result has plain (non-pytree) codegen: its placeholders are the forward's arguments and
its output node holds the model's output structure, so passes can rewrite outputs directly.
Parameters are shared with the source module, not copied.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.export import Dim
from torch.fx.passes.shape_prop import ShapeProp

from compressor.errors import CaptureError
from compressor.graph_pass import output_node


def capture_module(
    module: nn.Module, example_inputs: tuple[Any, ...], role: str, method: str
) -> fx.GraphModule:
    errors: list[str] = []
    methods = ["export", "symbolic_trace"] if method == "auto" else [method]
    for name in methods:
        try:
            if name == "export":
                return _export(module, example_inputs)
            return _symbolic_trace(module, example_inputs)
        except Exception as exc:
            errors.append(
                f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
    raise CaptureError(
        f"could not capture the {role} ({type(module).__name__}) with "
        + "; ".join(errors)
        + "\n  allowed capture.method values: auto, export, symbolic_trace"
    )


def _export(module: nn.Module, example_inputs: tuple[Any, ...]) -> fx.GraphModule:
    batch = Dim("batch")
    dynamic = tuple(
        pytree.tree_map(lambda x: {0: batch} if isinstance(x, torch.Tensor) else None, arg)
        for arg in example_inputs
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, example_inputs, dynamic_shapes=dynamic, strict=False)
    gm = program.module()
    out_spec = gm.graph._codegen.pytree_info.out_spec  # type: ignore[attr-defined]
    out = output_node(gm)
    leaves: Any = out.args[0]
    structure = pytree.tree_unflatten(list(leaves), out_spec)
    for node in list(gm.graph.nodes):
        if _is_guard(node) or _is_unused_attribute(node):
            gm.graph.erase_node(node)
    # ...and so does the pre-hook that checks calls against the exported pytree signature,
    # which passes may extend (e.g. MAE's patch_keep input).
    for key, hook in list(gm._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del gm._forward_pre_hooks[key]
    gm.graph._codegen = fx.graph.CodeGen()
    out.args = (structure,)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _is_guard(node: fx.Node) -> bool:
    # Input guards re-check shapes at every call; our callers pass the captured signature.
    return node.op == "call_module" and node.target == "_guards_fn"


def _is_unused_attribute(node: fx.Node) -> bool:
    # e.g. BatchNorm's num_batches_tracked, read only in training form
    return node.op == "get_attr" and not node.users


def _symbolic_trace(module: nn.Module, example_inputs: tuple[Any, ...]) -> fx.GraphModule:
    gm = fx.symbolic_trace(module)
    ShapeProp(gm).propagate(*example_inputs)
    return gm
