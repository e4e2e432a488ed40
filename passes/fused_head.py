"""`fused_head`: give the loss the lm_head's input and weights instead of its logits.

A language model's head turns [B, T, H] hidden states into [B, T, V] logits; with a 49k
vocabulary, those logits for both models, with their softmaxes and gradients, are most of a
KD step's memory. This pass exposes the head's input (`@head_hidden`), weight (`@head_weight`)
and bias (`@head_bias`, when it has one) as taps, so `kd` with `fused_head: true` computes the
divergence chunk by chunk (`compressor.cuda.kernels.linear_divergence`) and never holds
[N, V]. When no loss reads the model's own output, the head leaves the training graph (the
teacher's is then cut by `truncate_teacher`). Eval and export graphs keep their head.

Only logits that are exactly the head's linear output (dtype casts aside) are fused: a model
that scales or soft-caps them after the head is refused, since the fused loss would
optimise a different distribution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import fx, nn

from compressor.api import (
    GraphPass,
    NodeError,
    PassContext,
    PassResult,
    eliminate_dead_code,
    hookimpl,
    node_module_path,
    op_name,
    original_output,
    output_node,
    set_outputs,
    tapped,
)
from compressor.plugins.head_taps import BIAS, HIDDEN, WEIGHT

_LINEAR_OPS = (torch.ops.aten.linear.default, F.linear, torch._C._nn.linear)
# ops that only change the logits' dtype: the fused loss computes in fp32 either way
_CASTS = {"to", "_to_copy", "float", "type_as"}


class FusedHeadOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    head: str | None = Field(
        None, description="module path of the head (default: the linear layer giving the output)"
    )


class FusedHead(GraphPass[FusedHeadOptions]):
    """Expose the lm_head's input, weight and bias as taps; drop the head from training graphs
    whose output no loss reads."""

    name = "fused_head"
    runs_after = ("tap",)
    runs_before = ("truncate_teacher",)
    provides_taps = (HIDDEN, WEIGHT, BIAS)

    def __call__(self, gm: fx.GraphModule, context: PassContext) -> PassResult:
        if not context.training or HIDDEN in tapped(gm):
            return PassResult(gm, modified=False)
        head, rows = self._head_linear(gm, context.role)
        hidden, weight, bias = self._operands(gm, head)
        if rows is not None:  # logits over some tokens only: those rows of the head
            select = torch.ops.aten.index_select.default
            with gm.graph.inserting_before(output_node(gm)):
                weight = gm.graph.call_function(select, (weight, 0, rows))
                if bias is not None:
                    bias = gm.graph.call_function(select, (bias, 0, rows))
        taps = tapped(gm) | {HIDDEN: hidden, WEIGHT: weight}
        if bias is not None:
            taps[BIAS] = bias
        path = node_module_path(head) or "the top-level module"
        notes = [f"the loss reads the input and weights of {path} instead of its logits"]
        if context.output_needed:
            set_outputs(gm, original_output(gm), taps)
            notes.append("another loss reads the logits, so this graph still computes them")
        else:
            set_outputs(gm, None, taps)
        eliminate_dead_code(gm)
        return PassResult(gm, modified=True, notes=notes)

    def _head_linear(self, gm: fx.GraphModule, role: str) -> tuple[fx.Node, fx.Node | None]:
        """The linear node whose result is the graph's output, through dtype casts only, and
        the token ids the output keeps of it (a teacher read over a pruned student's
        vocabulary: `index_select` on the last dim), else None."""
        node = original_output(gm)
        if not isinstance(node, fx.Node):
            raise ValueError(
                f"the {role} returns {type(node).__name__}, not one logits tensor; fused_head "
                "needs a model whose output is its head's logits"
            )
        rows = None
        while (op_name(node) in _CASTS and node.op != "call_module") or (
            rows is None and _selects_last_dim(node)
        ):
            if op_name(node) == "index_select":
                rows = node.args[2]
            node = node.args[0]
        is_linear = (node.op == "call_function" and node.target in _LINEAR_OPS) or (
            node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Linear)
        )
        where = node_module_path(node) or "the top-level module"
        if not is_linear:
            raise NodeError(
                f"the {role}'s logits come from `{op_name(node)}` in {where}, after its head: "
                "fused_head computes the head's own linear output, so a scale or soft-capping "
                "applied to the logits would be optimised differently; use kd without "
                "fused_head for this model",
                node,
            )
        wanted = self.options.head
        if wanted is not None and where != wanted and not where.startswith(wanted + "."):
            raise NodeError(
                f"head {wanted!r} does not compute the {role}'s logits; {where} does "
                f"(set head: {where}, or leave head unset to use it)",
                node,
            )
        return node, rows if isinstance(rows, fx.Node) else None

    def _operands(
        self, gm: fx.GraphModule, head: fx.Node
    ) -> tuple[fx.Node, fx.Node, fx.Node | None]:
        """(input, weight, bias or None) of the head, as graph nodes."""
        if head.op == "call_function":
            args = list(head.args) + [head.kwargs.get("bias")]
            bias = args[2] if isinstance(args[2], fx.Node) else None
            return args[0], args[1], bias  # type: ignore[return-value]
        path = str(head.target)
        linear = gm.get_submodule(path)
        with gm.graph.inserting_before(head):
            weight = gm.graph.get_attr(f"{path}.weight")
            bias = gm.graph.get_attr(f"{path}.bias") if linear.bias is not None else None
        return head.args[0], weight, bias  # type: ignore[return-value]


def _selects_last_dim(node: fx.Node) -> bool:
    """`index_select(x, -1, ids)` on a 3-d tensor: logits over chosen tokens."""
    if op_name(node) != "index_select" or len(node.args) < 3:
        return False
    dim = node.args[1]
    shape = getattr(node.args[0], "meta", {}).get("val")
    rank = shape.dim() if isinstance(shape, torch.Tensor) else None
    return isinstance(dim, int) and (dim == -1 or (rank is not None and dim == rank - 1))


@hookimpl
def compressor_graph_passes() -> list[type]:
    return [FusedHead]
