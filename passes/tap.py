"""`tap`: expose intermediate outputs so losses can read them.

Losses name taps by module path (`features.2`); the plan passes those in the context and the
recipe may add more with `nodes:`. Each tap is the last node computed inside that module.
Names starting with `@` belong to the passes that provide them and are skipped here.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from torch import fx

from compressor.api import (
    PROVIDED,
    GraphPass,
    PassContext,
    PassResult,
    hookimpl,
    original_output,
    resolve_tap,
    set_outputs,
    tapped,
)


class TapOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    nodes: list[str] = []


class Tap(GraphPass[TapOptions]):
    """Expose intermediate outputs (module paths) as extra graph outputs."""

    name = "tap"

    def __call__(self, gm: fx.GraphModule, context: PassContext) -> PassResult:
        taps = tapped(gm)
        wanted = [t for t in (*context.taps, *self.options.nodes) if not t.startswith(PROVIDED)]
        missing = [path for path in dict.fromkeys(wanted) if path not in taps]
        if not missing:
            return PassResult(gm, modified=False)
        for path in missing:
            taps[path] = resolve_tap(gm, path)
        set_outputs(gm, original_output(gm), taps)
        gm.recompile()
        return PassResult(gm, modified=True)


@hookimpl
def compressor_graph_passes() -> list[type]:
    return [Tap]
