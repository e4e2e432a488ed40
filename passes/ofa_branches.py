"""`ofa_branches`: OFA-KD (One-for-All KD, Hao et al. 2023) exit branches on student stages.

A student of one family (CNN, ViT, MLP) cannot match a teacher of another feature for
feature, but every stage can be projected into the shared logit space. This pass attaches a
branch head to chosen student stages and exposes their logits as the tap `@ofa`
([stages, N, classes]), which the `ofa` loss reads. Following the authors' design, d = max(
stage width, teacher pre-logit width):

- (N, C, H, W) feature maps: depthwise-separable conv blocks (stride 2 until 2x2) to width
  d, global average pooling, a linear classifier;
- (N, L, D) tokens: 2x2 patch merging while a square token grid is 8x8 or larger, a linear
  projection to d, transformer blocks, token mean, a linear classifier;
- (N, D) vectors: a two-layer MLP classifier (a sound generic head for MLP students);
- anything else: an error naming the node and its shape.

Branches are scaffolding: trained with the student, removed by `strip`.
"""

from __future__ import annotations

import math
import re

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import fx, nn

from compressor.api import (
    SCAFFOLD_META,
    GraphPass,
    NodeError,
    PassContext,
    PassResult,
    format_shape,
    hookimpl,
    module_paths,
    node_shape,
    original_output,
    resolve_tap,
    set_outputs,
    tapped,
    token_grid,
)

TAP = "@ofa"
BRANCHES = "ofa_branches"


class OFAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stages: list[str] | None = Field(
        None, description="student module paths; default: 3 stages found by structure"
    )
    width: int | None = Field(
        None, gt=0, description="branch width d; default max(stage, teacher pre-logit)"
    )
    blocks: int = Field(1, ge=1, description="transformer blocks in token branches")


class SeparableConv(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
            nn.BatchNorm2d(c_in),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )


class ConvBranch(nn.Module):
    def __init__(self, channels: int, size: int, width: int, classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        while size > 2 or not layers:
            stride = 2 if size > 2 else 1
            layers.append(SeparableConv(c, width, stride))
            c, size = width, math.ceil(size / stride)
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(x).mean(dim=(2, 3)))


class PatchMerge(nn.Module):
    """2x2 neighbouring tokens concatenated and projected (Swin); a class token is dropped."""

    def __init__(self, dim: int, side: int, has_cls: bool):
        super().__init__()
        self.side, self.has_cls = side, has_cls
        self.norm = nn.LayerNorm(4 * dim)
        self.proj = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_cls:
            x = x[:, 1:]
        n, _, d = x.shape
        s = self.side
        x = (
            x.reshape(n, s // 2, 2, s // 2, 2, d)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(n, (s // 2) ** 2, 4 * d)
        )
        return self.proj(self.norm(x))


class TokenBranch(nn.Module):
    def __init__(self, tokens: int, dim: int, width: int, classes: int, blocks: int):
        super().__init__()
        merges: list[nn.Module] = []
        side, cls = token_grid(tokens)
        has_cls = cls == 1
        while side is not None and side >= 8 and side % 2 == 0:
            merges.append(PatchMerge(dim, side, has_cls))
            side, has_cls = side // 2, False
        self.merge = nn.Sequential(*merges)
        self.proj = nn.Linear(dim, width)
        heads = next(h for h in (8, 4, 2, 1) if width % h == 0)
        layer = nn.TransformerEncoderLayer(
            width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.proj(self.merge(x)))
        return self.fc(self.norm(x.mean(dim=1)))


class VectorBranch(nn.Sequential):
    def __init__(self, dim: int, width: int, classes: int):
        super().__init__(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, classes))


def default_stages(gm: fx.GraphModule, count: int = 3) -> list[str]:
    """Student stages found by structure: the shallowest family of sibling modules numbered
    alike (`blocks.0, blocks.1, ...`, or torchvision's `layer1, layer2, ...`) with at least
    two members, and `count` evenly spaced members of it (the last one feeds the head, so
    with four stages the branches go on the first three). Without such a family: the
    top-level modules that hold other modules (blocks rather than single layers), all but
    the last."""
    order: dict[str, None] = {}
    for path in module_paths(gm):
        parts = path.split(".")
        for depth in range(1, len(parts) + 1):
            order.setdefault(".".join(parts[:depth]), None)
    families: dict[tuple[str, str], list[str]] = {}
    for path in order:
        parent, _, leaf = path.rpartition(".")
        match = re.fullmatch(r"(.*?)(\d+)", leaf)
        if match:
            families.setdefault((parent, match.group(1)), []).append(path)
    candidates = [members for members in families.values() if len(members) >= 2]
    if candidates:
        members = min(candidates, key=lambda m: (m[0].count("."), -len(m)))
    else:
        blocks = [p for p in order if "." not in p and any(q.startswith(p + ".") for q in order)]
        members = blocks[:-1]
        if not members:
            raise ValueError(
                "found no stages to branch from (numbered blocks such as blocks.0 or layer1, "
                "or top-level modules that hold layers); name them with stages: [...]"
            )
        return members[-count:]
    picks = sorted({round(len(members) * (i + 1) / (count + 1)) - 1 for i in range(count)})
    return [members[max(0, i)] for i in picks]


def pre_logit_width(gm: fx.GraphModule | None) -> int | None:
    """Input width of the layer that produces a graph's logits."""
    output = original_output(gm) if gm is not None else None
    if (
        not isinstance(output, fx.Node)
        or not output.args
        or not isinstance(output.args[0], fx.Node)
    ):
        return None
    shape = node_shape(output.args[0])
    return int(shape[-1]) if shape and isinstance(shape[-1], int) else None


class OFABranches(GraphPass[OFAOptions]):
    """OFA-KD: branch heads projecting student stages into logit space (tap `@ofa`)."""

    name = "ofa_branches"
    provides_taps = (TAP,)

    def __call__(self, gm: fx.GraphModule, context: PassContext) -> PassResult:
        if context.role != "student" or TAP not in context.taps or TAP in tapped(gm):
            return PassResult(gm, modified=False)
        stages = self.options.stages or default_stages(gm)
        logits = original_output(gm)
        classes = node_shape(logits) if isinstance(logits, fx.Node) else None
        if not classes or not isinstance(classes[-1], int):
            raise ValueError(
                "ofa_branches needs a student whose output is one logits tensor [N, classes]"
            )
        nodes = [resolve_tap(gm, stage) for stage in stages]
        chosen = "given" if self.options.stages else "found by structure"
        notes = [
            f"branches on {len(stages)} stages ({chosen}): "
            + ", ".join(
                f"{stage} (node {node.name} {format_shape(node_shape(node))})"
                for stage, node in zip(stages, nodes, strict=True)
            )
        ]
        widths = [self._width(node, stage) for node, stage in zip(nodes, stages, strict=True)]
        width = self.options.width or max([*widths, pre_logit_width(context.peer) or 0])
        device = next(iter(gm.parameters())).device
        heads = nn.ModuleList(
            self._head(node, stage, width, classes[-1])
            for node, stage in zip(nodes, stages, strict=True)
        ).to(device)
        gm.add_submodule(BRANCHES, heads)
        out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        with gm.graph.inserting_before(out):
            calls = [
                gm.graph.call_module(f"{BRANCHES}.{i}", (node,)) for i, node in enumerate(nodes)
            ]
            stacked = gm.graph.call_function(torch.stack, (calls,))
        for node in (*calls, stacked):
            node.meta[SCAFFOLD_META] = True
        set_outputs(gm, logits, {**tapped(gm), TAP: stacked})
        gm.recompile()
        return PassResult(gm, modified=True, notes=notes)

    @staticmethod
    def _width(node: fx.Node, stage: str) -> int:
        shape = node_shape(node)
        if shape is None:
            raise NodeError(
                f"stage {stage!r}: the captured graph has no shape for node {node.name!r}", node
            )
        return int(shape[1] if len(shape) == 4 else shape[-1])

    def _head(self, node: fx.Node, stage: str, width: int, classes: int) -> nn.Module:
        shape = node_shape(node) or ()
        if len(shape) == 4 and isinstance(shape[2], int):
            return ConvBranch(int(shape[1]), int(shape[2]), width, classes)
        if len(shape) == 3 and isinstance(shape[1], int):
            return TokenBranch(int(shape[1]), int(shape[2]), width, classes, self.options.blocks)
        if len(shape) == 2:
            return VectorBranch(int(shape[1]), width, classes)
        raise NodeError(
            f"stage {stage!r} (node {node.name!r}) has shape {format_shape(shape)}; OFA branches "
            "take (N, C, H, W) feature maps, (N, L, D) tokens or (N, D) vectors",
            node,
        )


@hookimpl
def compressor_graph_passes() -> list[type]:
    return [OFABranches]
