"""`router_logits`: expose every MoE router's logits and gates as taps.

The routers of `MoEBlock`s (upcycled students, or Hugging Face MoE models after
`moe_routing`) each give [tokens, experts] logits, and the block's top-k gates (zero off the
experts a token was sent to) follow from them; this pass stacks each, in the order the model
computes them, into [blocks, tokens, experts]: `@router_logits` and `@router_gates`, for the
load-balancing loss. A loss that reads them brings the pass; the eval and export graphs
never compute the stacks.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import fx

from compressor.api import (
    SCAFFOLD_META,
    GraphPass,
    PassContext,
    PassResult,
    hookimpl,
    node_shape,
    original_output,
    set_outputs,
    tapped,
)
from compressor.plugins.moe_block import Router, TopKGates
from compressor.plugins.moe_losses import ROUTER_GATES, ROUTER_LOGITS


class RouterLogitsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RouterLogits(GraphPass[RouterLogitsOptions]):
    """Stack every MoE router's logits and gates into the taps `@router_logits` and
    `@router_gates` [L, N, E]."""

    name = "router_logits"
    runs_after = ("tap",)
    runs_before = ("truncate_teacher",)
    provides_taps = (ROUTER_LOGITS, ROUTER_GATES)

    def __call__(self, gm: fx.GraphModule, context: PassContext) -> PassResult:
        if not context.training or ROUTER_LOGITS in tapped(gm):
            return PassResult(gm, modified=False)
        routers, gates = module_nodes(gm, Router), module_nodes(gm, TopKGates)
        if not routers:
            raise ValueError(
                f"the {context.role} has no MoE router (an MoEBlock's gate), so there are no "
                "router logits to read: build experts with the moe_upcycle pass, or swap a "
                "Hugging Face MoE model's blocks with moe_routing"
            )
        widths = {shape[-1] for n in routers.values() if (shape := node_shape(n))}
        if len(widths) > 1:
            raise ValueError(
                f"the {context.role}'s MoE blocks have different numbers of experts "
                f"({sorted(widths)}); the balance loss stacks routers of one width"
            )
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        taps = tapped(gm)
        for name, nodes in ((ROUTER_LOGITS, routers), (ROUTER_GATES, gates)):
            last = max(nodes.values(), key=order.__getitem__)
            with gm.graph.inserting_after(last):
                stacked = gm.graph.call_function(torch.stack, (list(nodes.values()), 0))
            stacked.meta[SCAFFOLD_META] = True
            taps[name] = stacked
        set_outputs(gm, original_output(gm), taps)
        gm.recompile()
        paths = list(routers)
        return PassResult(
            gm,
            modified=True,
            notes=[f"@router_logits stacks {len(paths)} routers ({paths[0]} to {paths[-1]})"],
        )


def module_nodes(gm: fx.GraphModule, kind: type) -> dict[str, fx.Node]:
    """Module path -> the last tensor computed inside each module of class `kind` (its
    output), in graph order."""
    found: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_module"):
            continue
        stack = node.meta.get("nn_module_stack")
        if stack:
            path, owner = list(stack.values())[-1]
            matches = owner is kind or (
                isinstance(owner, str) and owner.rsplit(".", 1)[-1] == kind.__name__
            )
        elif node.op == "call_module":
            path = str(node.target)
            matches = isinstance(gm.get_submodule(path), kind)
        else:
            continue
        if matches and isinstance(node.meta.get("val"), torch.Tensor):
            found[str(path)] = node
    return found


@hookimpl
def compressor_graph_passes() -> list[type]:
    return [RouterLogits]
