"""Test helpers for plugin authors: `check_pass` checks a graph pass the way compressor
checks its own.

It checks the node-count change, that `modified` is honest (the code changed exactly when the
pass says so), that a second run changes nothing, and that the original output is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from compressor.graph_pass import GraphPass, PassContext, PassResult, split_outputs


def check_pass(
    graph_pass: GraphPass,
    gm: fx.GraphModule,
    context: PassContext,
    inputs: tuple[Any, ...],
    *,
    modified: bool,
    node_delta: int | None = None,
    same_output: bool = True,
    inputs_after: tuple[Any, ...] | None = None,
) -> fx.GraphModule:
    """Run `graph_pass` on `gm` and assert what a well-behaved pass guarantees; returns the
    rewritten graph. `same_output=False` for passes that change what the graph returns
    (truncation); `inputs_after`: what the rewritten graph takes, when the pass added inputs."""
    before_nodes = len(gm.graph.nodes)
    before_code = gm.code
    with torch.no_grad():
        reference, _ = split_outputs(gm, gm(*inputs))
    result = graph_pass(gm, context)
    assert isinstance(result, PassResult)
    after = result.graph_module
    after.graph.lint()
    assert result.modified is modified, (
        f"{graph_pass.name}: modified={result.modified}, expected {modified}"
    )
    assert (after.code != before_code) == result.modified, (
        f"{graph_pass.name}: dishonest `modified`"
    )
    if node_delta is not None:
        assert len(after.graph.nodes) - before_nodes == node_delta
    code = after.code
    again = graph_pass(after, context)
    assert not again.modified, f"{graph_pass.name} is not idempotent"
    assert again.graph_module.code == code
    if same_output:
        with torch.no_grad():
            output, _ = split_outputs(after, after(*(inputs_after or inputs)))
        # None on both sides is equal; None on one side (a dropped output) is not
        torch.testing.assert_close(output, reference, equal_nan=False)
    return after
