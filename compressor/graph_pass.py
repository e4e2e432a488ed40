"""Graph passes: `GraphModule -> PassResult`, ordered by declared constraints.

Conventions every pass shares:
- A node's module path (`features.2`, `encoder.layer.3`) comes from `nn_module_stack` metadata
  (torch.export) or the call_module target (symbolic_trace).
- A tapped graph returns `(original_output, {tap_name: tensor})`; its output node carries
  `TAPS_META`, so the tap structure travels with the graph itself.
- Nodes added only for distillation carry `SCAFFOLD_META`; `strip` removes them. A scaffold
  node in the main data path (MAE token masking) sets it to `BYPASS`: strip routes its users
  to its first argument.
- Taps named `@name` are not module paths: a pass that lists the name in `provides_taps`
  creates them (`@ofa`: the OFA branch logits), and the plan adds that pass when a loss
  reads one.
- A pass may add graph inputs (placeholders carrying `INPUT_META`, e.g. MAE's kept patch
  indices); the engine draws each once per batch and feeds the same tensor to both graphs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx
from torch._functorch import predispatch

from compressor.components import Component, OptionsT
from compressor.errors import PassError

TAPS_META = "compressor_taps"
NOTES_META = "compressor_pass_notes"
SCAFFOLD_META = "compressor_scaffold"
BYPASS = "bypass"
INPUT_META = "compressor_input"
OUTPUT = "output"  # the name a loss uses for a model's own output
PROVIDED = "@"  # prefix of tap names that passes provide


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    # what the pass decided on its own, for `compress validate` and `compress graph` to show
    # (e.g. which nodes OFA branches read)
    notes: list[str] = field(default_factory=list)


class NodeError(ValueError):
    """A pass cannot handle a node: `run_passes` reports the pass, the passes before it and
    the node with its module path."""

    def __init__(self, message: str, node: fx.Node | None):
        super().__init__(message)
        self.node = node


@dataclass
class PassContext:
    """What the plan asks of one graph: its role, the taps losses read, whether its output is
    read; `peer` is the other model's captured graph (before its passes), when there is one;
    `training` is False for the student's eval and export graph, which passes also rewrite
    (and `strip` then cleans) but which must keep computing the model's own output."""

    role: str
    taps: list[str] = field(default_factory=list)
    output_needed: bool = True
    peer: fx.GraphModule | None = None
    training: bool = True


class GraphPass(Component[OptionsT]):
    """A rewrite of a captured graph. Subclasses set `name` and implement `__call__`."""

    runs_after: ClassVar[tuple[str, ...]] = ()
    runs_before: ClassVar[tuple[str, ...]] = ()
    provides_taps: ClassVar[tuple[str, ...]] = ()  # `@name` taps this pass creates

    def __call__(self, gm: fx.GraphModule, context: PassContext) -> PassResult:
        raise NotImplementedError


class TapNotFound(LookupError):
    def __init__(self, path: str, available: list[str]):
        self.path = path
        self.available = available
        super().__init__(f"no node comes from module {path!r}")


# -- node helpers -------------------------------------------------------------------------------
def node_module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return str(path)
    if node.op == "call_module":
        return str(node.target)
    return ""


def node_shape(node: fx.Node) -> tuple[Any, ...] | None:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return tuple(meta.shape)
    return None


def format_shape(shape: tuple[Any, ...] | None) -> str:
    """A shape for people: `[N, 64, 8, 8]`. Dimension 0 is the batch, dynamic in every captured
    graph (N); other dynamic dimensions are the sequence (T). torch's internal symbols (`s77`)
    never reach a message."""
    if shape is None:
        return "unknown"
    dims = ["N" if i == 0 else str(d) if isinstance(d, int) else "T" for i, d in enumerate(shape)]
    return "[" + ", ".join(dims) + "]"


def token_grid(tokens: int) -> tuple[int | None, int]:
    """(side, class tokens) when `tokens` is a square patch grid, optionally after one class
    token; (None, 0) otherwise."""
    for cls in (0, 1):
        side = math.isqrt(tokens - cls)
        if side > 1 and side * side == tokens - cls:
            return side, cls
    return None, 0


def module_paths(gm: fx.GraphModule) -> list[str]:
    """Module paths that own at least one computing node, in graph order."""
    seen: dict[str, None] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_module", "call_method"):
            path = node_module_path(node)
            if path and not path.startswith("_"):  # export's own bookkeeping scopes
                seen.setdefault(path, None)
    return list(seen)


def resolve_tap(gm: fx.GraphModule, path: str) -> fx.Node:
    """The last tensor-valued node computed inside module `path` (its output).

    `path:op` picks the last `op` node inside the module instead, for values a module
    computes but does not return: `encoder.layer.3.attention.self:softmax` is that layer's
    attention distribution (with eager attention)."""
    path, _, op = path.partition(":")
    found = None
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_module", "call_method"):
            continue
        owner = node_module_path(node)
        if owner == path or owner.startswith(path + "."):
            value = node.meta.get("val")
            if op and op not in op_name(node):
                continue
            if value is None or isinstance(value, torch.Tensor):
                found = node
    if found is None:
        available = module_paths(gm)
        if op and path in {p.partition(":")[0] for p in available}:
            ops = sorted({op_name(n) for n in gm.graph.nodes if node_module_path(n) == path})
            raise TapNotFound(f"{path}:{op}", [f"{path}:{o}" for o in ops])
        raise TapNotFound(path if not op else f"{path}:{op}", available)
    return found


def op_name(node: fx.Node) -> str:
    """The op a node calls, without overload: `softmax` for aten.softmax.int."""
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    return name.split(".")[0]  # aten ops print as softmax.int


def output_node(gm: fx.GraphModule) -> fx.Node:
    last = next(iter(reversed(gm.graph.nodes)))  # where fx puts it: looked up every step
    if last.op == "output":
        return last
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def tapped(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """The tap nodes of a tapped graph (empty when the graph has none)."""
    out = output_node(gm)
    if TAPS_META not in out.meta:
        return {}
    result: Any = out.args[0]
    return dict(result[1])


def original_output(gm: fx.GraphModule) -> Any:
    out = output_node(gm)
    result: Any = out.args[0]
    return result[0] if TAPS_META in out.meta else result


def set_outputs(gm: fx.GraphModule, original: Any, taps: dict[str, fx.Node]) -> None:
    """Rewrite the output node; no taps means the graph returns its original output again."""
    out = output_node(gm)
    if taps:
        out.args = ((original, dict(taps)),)
        out.meta[TAPS_META] = list(taps)
    else:
        out.args = (original,)
        out.meta.pop(TAPS_META, None)


def tap_shapes(gm: fx.GraphModule, names: list[str]) -> dict[str, tuple[Any, ...] | None]:
    """The captured shapes of a tapped graph's `names` (`output`, or taps)."""
    taps = tapped(gm)
    out: dict[str, tuple[Any, ...] | None] = {}
    for name in names:
        if name == OUTPUT:
            node = original_output(gm)
            out[name] = node_shape(node) if isinstance(node, fx.Node) else None
        else:
            out[name] = node_shape(taps[name])
    return out


def graph_inputs(gm: fx.GraphModule) -> dict[str, dict[str, Any]]:
    """Inputs added by passes: placeholder name -> how to draw it (`INPUT_META`)."""
    return {
        str(n.target): dict(n.meta[INPUT_META])
        for n in gm.graph.nodes
        if n.op == "placeholder" and INPUT_META in n.meta
    }


def graph_input_specs(graphs: list[fx.GraphModule | None]) -> dict[str, dict[str, Any]]:
    """The inputs passes added to any of `graphs`; one spec per name, agreed by all graphs."""
    specs: dict[str, dict[str, Any]] = {}
    for gm in graphs:
        for name, spec in (graph_inputs(gm) if gm is not None else {}).items():
            if specs.setdefault(name, spec) != spec:
                raise ValueError(
                    f"graph input {name!r} is drawn differently by the two graphs: {specs[name]} vs {spec}"
                )
    return specs


def draw_inputs(
    specs: dict[str, dict[str, Any]], batch: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """One tensor per added input, shared by every graph that takes it (one mask per sample
    for teacher and student alike). Draws from torch's RNG, so seeding and resume hold."""
    out = {}
    for name, spec in specs.items():
        if spec["kind"] != "random_keep":
            raise ValueError(f"graph input {name!r}: unknown kind {spec['kind']!r}")
        # [batch, keep]: a random subset of token indices per sample, in ascending order
        order = torch.rand(batch, spec["tokens"]).argsort(dim=1)[:, : spec["keep"]]
        out[name] = order.sort(dim=1).values.to(device)
    return out


def draw_graph_inputs(
    graphs: list[fx.GraphModule | None], batch: int, device: torch.device
) -> dict[str, torch.Tensor]:
    return draw_inputs(graph_input_specs(graphs), batch, device)


def split_outputs(gm: fx.GraphModule, result: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    if TAPS_META in output_node(gm).meta:
        return result[0], result[1]
    return result, {}


# Calls that change interpreter state although they return nothing anyone reads: transformers
# builds attention masks under torch.vmap, and a graph that lost the nesting calls around the
# vmapped ops fails when it runs ("your tensor may have escaped from inside a function being
# vmapped"). fx's own list has the jvp pair but not these.
_STATEFUL_CALLS = {predispatch._vmap_increment_nesting, predispatch._vmap_decrement_nesting}


def _is_impure(node: fx.Node) -> bool:
    # fx's rules (mutation, side-effectful calls, effect tokens), except for two kinds of call
    # a truncated teacher must lose with the layers after its deepest tap: dropout and other
    # seeded ops, and the checks export records (_assert_tensor_metadata, sym_constrain_range
    # ...), which only look at values nobody needs once those layers are gone.
    if node.op == "call_function":
        if node.target in _STATEFUL_CALLS:
            return True
        if op_name(node).startswith(("_assert", "sym_constrain_range")):
            return False
    return node.is_impure(impure_random=False)


def delete_unused_submodules(gm: fx.GraphModule) -> None:
    """Drop submodules no node reads. Unlike fx's `delete_all_unused_submodules`, a module
    that a node reads keeps its whole subtree: higher-order ops (autocast and grad-mode
    regions in Llama's rotary embedding) are subgraphs whose own code reads their children."""
    used = {str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}

    def needed(path: str) -> bool:
        return any(u == path or u.startswith(path + ".") or path.startswith(u + ".") for u in used)

    deleted: list[str] = []
    for path, _ in list(gm.named_modules()):  # parents come before their children
        if not path or needed(path) or any(path.startswith(d + ".") for d in deleted):
            continue
        owner, _, name = path.rpartition(".")
        parent = gm.get_submodule(owner) if owner else gm
        del parent._modules[name]
        deleted.append(path)


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    delete_unused_submodules(gm)
    _delete_unused_attributes(gm)
    gm.recompile()


def _delete_unused_attributes(gm: fx.GraphModule) -> None:
    """Drop parameters and buffers no get_attr node reads any more (e.g. cut-off layers)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    used |= {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    names = [name for name, _ in gm.named_parameters()] + [name for name, _ in gm.named_buffers()]
    for name in names:
        if name in used or any(name.startswith(u + ".") for u in used):
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]


# -- running passes ------------------------------------------------------------------------------
def order_passes(passes: Iterable[GraphPass]) -> list[GraphPass]:
    """Topological order from runs_after/runs_before, which name passes and so bind every
    entry of that name; entries of one name keep their given order, and so do ties."""
    items = list(passes)
    before: list[set[int]] = [set() for _ in items]  # before[i]: the entries that precede i
    for i, p in enumerate(items):
        for j, q in enumerate(items):
            if j == i:
                continue
            if q.name in p.runs_after or p.name in q.runs_before or q.name == p.name and j < i:
                before[i].add(j)
    ordered: list[int] = []
    while len(ordered) < len(items):
        ready = [i for i in range(len(items)) if i not in ordered and before[i] <= set(ordered)]
        if not ready:
            stuck = sorted({items[i].name for i in range(len(items)) if i not in ordered})
            raise PassError(f"graph passes {stuck} have contradictory runs_after/runs_before")
        ordered.append(ready[0])
    return [items[i] for i in ordered]


def run_passes(
    gm: fx.GraphModule, passes: Iterable[GraphPass], context: PassContext
) -> fx.GraphModule:
    """Run passes in constraint order; a failure names the pass, the passes before it and the node."""
    ran: list[str] = []
    for graph_pass in order_passes(passes):
        try:
            result = graph_pass(gm, context)
            if not isinstance(result, PassResult):
                raise TypeError(f"returned {type(result).__name__}, expected PassResult")
            result.graph_module.graph.lint()
        except PassError:
            raise
        except Exception as exc:
            node = exc.node if isinstance(exc, NodeError) else None
            at = (
                f" at node {node.name!r} ({node_module_path(node) or 'top-level module'})"
                if node
                else ""
            )
            raise PassError(
                f"graph pass {graph_pass.name!r} failed on the {context.role} graph{at}: "
                f"{type(exc).__name__}: {exc}\n  passes that ran before it: {ran or 'none'}"
            ) from exc
        gm = result.graph_module
        ran.append(graph_pass.name)
        for note in result.notes:
            gm.meta.setdefault(NOTES_META, []).append(f"{graph_pass.name}: {note}")
    return gm


def pass_notes(gm: fx.GraphModule) -> list[str]:
    """What the passes that rewrote `gm` decided on their own (`PassResult.notes`)."""
    return list(gm.meta.get(NOTES_META, []))


def fork(gm: fx.GraphModule) -> fx.GraphModule:
    """A second GraphModule over the same parameters and buffers with its own copy of the
    graph, so passes can rewrite one (truncate a teacher) and leave the other whole."""
    graph = copy.deepcopy(gm.graph)
    forked = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    forked.meta.update(gm.meta)
    return forked
