"""A third-party plugin: one graph pass and one loss, registered through an entry point."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from compressor import hookimpl
from compressor.graph_pass import GraphPass, PassContext, PassResult
from compressor.losses import LossInputs, LossTerm


class GeluActivations(GraphPass):
    """Swap every ReLU of the graph for GELU (a student-architecture rewrite)."""

    name = "gelu_activations"
    runs_before = ("tap",)

    def __call__(self, gm: torch.fx.GraphModule, context: PassContext) -> PassResult:
        relus = [
            n
            for n in gm.graph.nodes
            if n.op == "call_function" and n.target is torch.ops.aten.relu.default
        ]
        for node in relus:
            node.target = torch.ops.aten.gelu.default
        if relus:
            gm.recompile()
        return PassResult(gm, modified=bool(relus))


class L1Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = Field(1.0, gt=0)


class LogitL1(LossTerm):
    """Mean absolute difference between student and teacher logits."""

    name = "logit_l1"
    Options = L1Options

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        s, t = inputs.student["output"].float(), inputs.teacher["output"].float()
        return self.options.scale * (s - t).abs().mean()


@hookimpl
def compressor_graph_passes() -> list[type]:
    return [GeluActivations]


@hookimpl
def compressor_losses() -> list[type]:
    return [LogitL1]
