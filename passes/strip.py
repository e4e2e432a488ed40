"""`strip`: remove all distillation scaffolding before export.

Taps are dropped from the outputs and every node marked as scaffolding (branches added by
passes, inputs such as MAE's patch indices) is erased with whatever only it used; scaffolding
in the main path (MAE's token selection) is bypassed first. The exported student is exactly
the plain student.
"""

from __future__ import annotations

from torch import fx

from compressor.api import (
    BYPASS,
    SCAFFOLD_META,
    GraphPass,
    NodeError,
    NoOptions,
    PassContext,
    PassResult,
    eliminate_dead_code,
    hookimpl,
    original_output,
    set_outputs,
    tapped,
)


class Strip(GraphPass[NoOptions]):
    """Remove taps and scaffolding nodes so the graph is the plain student."""

    name = "strip"

    def __call__(self, gm: fx.GraphModule, context: PassContext) -> PassResult:
        scaffold = [n for n in gm.graph.nodes if n.meta.get(SCAFFOLD_META)]
        if not tapped(gm) and not scaffold:
            return PassResult(gm, modified=False)
        set_outputs(gm, original_output(gm), {})
        for node in scaffold:
            if node.meta[SCAFFOLD_META] == BYPASS:
                node.replace_all_uses_with(node.args[0])
        for node in reversed(scaffold):
            if node.users:
                raise NodeError(
                    f"scaffolding node still feeds {[u.name for u in node.users]}; "
                    "scaffolding may only feed other scaffolding or taps",
                    node,
                )
            gm.graph.erase_node(node)
        eliminate_dead_code(gm)
        return PassResult(gm, modified=True)


@hookimpl
def compressor_graph_passes() -> list[type]:
    return [Strip]
