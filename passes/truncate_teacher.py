"""`truncate_teacher`: the teacher computes only what the losses read.

When no loss reads the teacher's own output, everything after its deepest tapped node is
removed, so a loss on layer 2 of 6 runs 3 layers. A teacher whose output is read is left whole.
"""

from __future__ import annotations

from torch import fx

from compressor.api import (
    GraphPass,
    NoOptions,
    PassContext,
    PassResult,
    eliminate_dead_code,
    hookimpl,
    original_output,
    set_outputs,
    tapped,
)


class TruncateTeacher(GraphPass[NoOptions]):
    """Remove teacher layers after the deepest node a loss reads."""

    name = "truncate_teacher"
    runs_after = ("tap",)

    def __call__(self, gm: fx.GraphModule, context: PassContext) -> PassResult:
        taps = tapped(gm)
        if context.role != "teacher" or context.output_needed or not taps:
            return PassResult(gm, modified=False)
        if original_output(gm) is None:
            return PassResult(gm, modified=False)
        set_outputs(gm, None, taps)
        eliminate_dead_code(gm)
        return PassResult(gm, modified=True)


@hookimpl
def compressor_graph_passes() -> list[type]:
    return [TruncateTeacher]
