"""`mae_mask`: DMAE-style partial execution on visible patches (Bai et al., "Masked
Autoencoders Enable Efficient Knowledge Distillers", 2023).

A random subset of patch tokens is kept per sample (ratio `ratio` masked, default 0.75) and
the same subset is used by teacher and student, so both encoders see only the visible
patches plus the class token. The rewrite selects tokens at the input of the first
transformer block (after positional embeddings), which works for plain-PyTorch ViTs and
timm-style layouts (`blocks.0`). With `truncate_teacher`, the teacher then runs only up to
the block a loss reads, on a quarter of the tokens.

The kept indices are a new graph input (`patch_keep`, drawn by the engine once per batch);
the selection is bypass scaffolding, so `strip` restores the plain student for export.

Changing the token count after capture needs a graph whose ops read the sequence length at
run time: capture with `symbolic_trace` (torch.export specialises it into the graph, and the
pass says so rather than failing later inside a reshape).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import fx

from compressor.api import (
    BYPASS,
    INPUT_META,
    SCAFFOLD_META,
    GraphPass,
    NodeError,
    PassContext,
    PassResult,
    format_shape,
    hookimpl,
    module_paths,
    node_module_path,
    node_shape,
    token_grid,
)

KEEP = "patch_keep"


class MAEOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ratio: float = Field(0.75, gt=0, lt=1, description="fraction of patch tokens masked")
    block: str = Field("blocks.0", description="module whose input tokens are masked")
    class_tokens: int | None = Field(
        None, ge=0, description="leading tokens always kept; default: detected"
    )


def keep_tokens(tokens: torch.Tensor, keep: torch.Tensor, class_tokens: int) -> torch.Tensor:
    """[N, C + L, D] tokens -> [N, C + K, D]: the class tokens, then the patches in `keep` [N, K]."""
    index = keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    return torch.cat([tokens[:, :class_tokens], tokens[:, class_tokens:].gather(1, index)], dim=1)


class MAEMask(GraphPass[MAEOptions]):
    """Mask patch tokens (same random subset for teacher and student) before the first block."""

    name = "mae_mask"
    runs_before = ("tap", "truncate_teacher")

    def __call__(self, gm: fx.GraphModule, context: PassContext) -> PassResult:
        if any(n.op == "placeholder" and n.target == KEEP for n in gm.graph.nodes):
            return PassResult(gm, modified=False)
        block = self.options.block
        inside = [n for n in gm.graph.nodes if _in_scope(n, block) and n.op != "get_attr"]
        if not inside:
            raise ValueError(
                f"the {context.role} has no module {block!r}, so no patch tokens to mask; "
                f"set block: to its first transformer block (module paths: {', '.join(module_paths(gm)[:12])}, ...)"
            )
        baked = next((n for n in inside if isinstance(n.target, torch._ops.OpOverload)), None)
        if baked is not None:
            raise NodeError(
                f"the {context.role} graph was captured by torch.export, which bakes the token "
                f"count into ops such as {baked.target}; token masking needs capture.method: "
                "symbolic_trace, where modules read the sequence length when they run",
                baked,
            )
        tokens = next((a for a in inside[0].all_input_nodes if not _in_scope(a, block)), None)
        shape = node_shape(tokens) if tokens is not None else None
        if tokens is None or shape is None or len(shape) != 3 or not isinstance(shape[1], int):
            raise NodeError(
                f"the input of {block!r} in the {context.role} is not patch tokens (N, T, D): "
                f"node {getattr(tokens, 'name', '?')!r} has shape {format_shape(shape)}",
                tokens or inside[0],
            )
        count = int(shape[1])
        side, detected = token_grid(count)
        class_tokens = (
            self.options.class_tokens if self.options.class_tokens is not None else detected
        )
        if side is None and self.options.class_tokens is None:
            raise ValueError(
                f"{count} tokens at {block!r} are not a square patch grid (+1 class token); set class_tokens:"
            )
        patches = count - class_tokens
        keep = max(1, round(patches * (1 - self.options.ratio)))

        last_placeholder = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
        with gm.graph.inserting_after(last_placeholder):
            keep_ids = gm.graph.placeholder(KEEP)
        keep_ids.meta[INPUT_META] = {"kind": "random_keep", "tokens": patches, "keep": keep}
        keep_ids.meta[SCAFFOLD_META] = True
        with gm.graph.inserting_after(tokens):
            masked = gm.graph.call_function(keep_tokens, (tokens, keep_ids, class_tokens))
        masked.meta[SCAFFOLD_META] = BYPASS
        for user in list(tokens.users):
            if user is not masked:
                user.replace_input_with(tokens, masked)
        gm.recompile()
        return PassResult(gm, modified=True)


def _in_scope(node: fx.Node, block: str) -> bool:
    path = node_module_path(node)
    return path == block or path.startswith(block + ".")


@hookimpl
def compressor_graph_passes() -> list[type]:
    return [MAEMask]
