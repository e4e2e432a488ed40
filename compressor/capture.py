"""Capture an nn.Module into a torch.fx GraphModule with a dynamic batch dimension.

The result has plain (non-pytree) codegen: its placeholders are the forward's arguments and
its output node holds the model's output structure, so passes can rewrite outputs directly.
Parameters are shared with the source module, not copied.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.export import Dim
from torch.fx.passes.shape_prop import ShapeProp

from compressor.errors import CaptureError, first_line
from compressor.graph_pass import delete_unused_submodules, output_node
from compressor.loading import user_frame

# what the model's output is called (`logits`, `last_hidden_state`): exporters name it so
OUTPUT_NAME_META = "compressor_output_name"


def capture_module(
    module: nn.Module, example_inputs: tuple[Any, ...], role: str, method: str
) -> fx.GraphModule:
    errors: list[str] = []
    methods = ["export", "symbolic_trace"] if method == "auto" else [method]
    for name in methods:
        try:
            # torch prints the partial graph of a failed export (hundreds of lines) to stderr
            with contextlib.redirect_stderr(io.StringIO()):
                gm = (_export if name == "export" else _symbolic_trace)(module, example_inputs)
            gm.meta[OUTPUT_NAME_META] = getattr(module, "output_name", "logits")
            return gm
        except Exception as exc:
            errors.append(f"{name}: {_cause(exc)}")
    raise CaptureError(
        f"could not capture the {role} ({type(module).__name__})\n  "
        + "\n  ".join(errors)
        + "\n  allowed capture.method values: auto, export, symbolic_trace"
    )


def _cause(exc: BaseException) -> str:
    """The first line of a capture error and the model source line that raised it."""
    lines = str(exc).strip().splitlines()
    text = first_line(exc)
    for i, line in enumerate(lines):  # torch.export names the call: File "...", line N
        found = re.match(r'\s*File "(.+)", line (\d+), in (\S+)', line)
        if found and any("raised this error" in earlier for earlier in lines[max(0, i - 2) : i]):
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{text}\n    at {found[1]}:{found[2]} in {found[3]}: {code}"
    frame = user_frame(exc)
    return f"{text}\n    at {frame}" if frame else text


def _export(module: nn.Module, example_inputs: tuple[Any, ...]) -> fx.GraphModule:
    batch = Dim("batch")
    args: tuple[Any, ...] = example_inputs
    kwargs: dict[str, Any] = {}
    dynamic: Any = tuple(
        pytree.tree_map(lambda x: {0: batch} if isinstance(x, torch.Tensor) else None, arg)
        for arg in example_inputs
    )
    if len(example_inputs) == 1 and isinstance(example_inputs[0], dict):
        # named inputs (Hugging Face): batch and sequence axes are dynamic; AUTO lets export
        # bound the sequence by what the model allows (BERT: its position table)
        args, kwargs = (), example_inputs[0]
        dynamic = {
            k: {0: batch, 1: Dim.AUTO} if v.dim() >= 2 else {0: batch} for k, v in kwargs.items()
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(
            module, args, kwargs=kwargs, dynamic_shapes=dynamic, strict=False
        )
    gm = program.module()
    out_spec = gm.graph._codegen.pytree_info.out_spec  # type: ignore[attr-defined]
    out = output_node(gm)
    leaves: Any = out.args[0]
    structure = pytree.tree_unflatten(list(leaves), out_spec)
    for node in list(gm.graph.nodes):
        if _is_guard(node) or _is_unused_attribute(node):
            gm.graph.erase_node(node)
    # ...and so do the hooks export adds: one checks calls against the exported pytree
    # signature, which passes may extend (e.g. MAE's patch_keep input); the others register
    # nn.Module-typed inputs as pytree nodes, and our inputs are tensors. Without hooks a
    # call takes nn.Module's fast path: microseconds a step for small models.
    for hooks in (gm._forward_pre_hooks, gm._forward_hooks):
        for key, hook in list(hooks.items()):
            if _added_by_export(hook):
                del hooks[key]
                gm._forward_hooks_always_called.pop(key, None)
    gm.graph._codegen = fx.graph.CodeGen()
    out.args = (structure,)
    delete_unused_submodules(gm)
    gm.recompile()
    return gm


def _added_by_export(hook: Any) -> bool:
    name = getattr(hook, "__qualname__", "")
    return name == "_check_input_constraints_pre_hook" or name.startswith(
        "_create_stateful_graph_module."
    )


def _is_guard(node: fx.Node) -> bool:
    # Input guards re-check shapes at every call; our callers pass the captured signature.
    return node.op == "call_module" and node.target == "_guards_fn"


def _is_unused_attribute(node: fx.Node) -> bool:
    # e.g. BatchNorm's num_batches_tracked, read only in training form
    return node.op == "get_attr" and not node.users


def _symbolic_trace(module: nn.Module, example_inputs: tuple[Any, ...]) -> fx.GraphModule:
    gm = fx.symbolic_trace(module)
    if len(example_inputs) == 1 and isinstance(example_inputs[0], dict):
        ShapeProp(gm).propagate(*example_inputs[0].values())
    else:
        ShapeProp(gm).propagate(*example_inputs)
    return gm
