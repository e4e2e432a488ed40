"""A causal LM's captured graph given a key/value cache, for export as a cached decoder.

The student graph the run trained (every graph pass applied) computes logits of whole
sequences. `with_kv_cache` rewrites a copy of it so that each attention layer also reads the
keys and values of earlier tokens and returns them with this call's appended, in the layout
Hugging Face runtimes expect:

    inputs:  input_ids [B, T], attention_mask [B, P + T], position_ids [B, T],
             past_key_values.{i}.key / .value [B, kv_heads, P, head_dim] per layer
    outputs: logits [B, T, V], present.{i}.key / .value [B, kv_heads, P + T, head_dim]

The rewrite works on the attention as Hugging Face's eager implementation writes it
(scores = q @ k^T, plus an additive mask, softmax, @ v), found by structure, so it holds for
any family whose blocks attend that way. Per attention layer it:
- appends the cache to the keys and values before their grouped-query repeat,
- replaces the model's own mask (causal over T tokens) by one over P + T keys, and
- feeds the rotary or learned position embedding from `position_ids`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from compressor.api import ExportError, eliminate_dead_code, output_node

aten = torch.ops.aten
MATMULS = {aten.matmul.default, aten.bmm.default}
SOFTMAXES = {aten.softmax.int, aten._softmax.default}
# ops that only lay a tensor out again: the grouped-query repeat of keys and values
REPEAT_OPS = {
    aten.slice.Tensor,
    aten.unsqueeze.default,
    aten.expand.default,
    aten.reshape.default,
    aten.view.default,
    aten._unsafe_view.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
}
# what may stand between an attention's score matmul and its softmax besides the mask add
SCORE_OPS = {
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.tanh.default,
    aten.to.dtype,
    aten._to_copy.default,
    aten.add.Tensor,
    aten.where.self,  # transformers 4's GPT-2 masks its scores causally itself
}
PROB_OPS = {aten.to.dtype, aten._to_copy.default, aten.dropout.default, aten.type_as.default}


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


@dataclass(frozen=True)
class CacheLayout:
    """What the cached graph reads and returns, as a runtime needs to know it."""

    layers: int
    kv_heads: int
    head_dim: int

    @property
    def input_names(self) -> list[str]:
        pasts = [past_name(i, k) for i in range(self.layers) for k in ("key", "value")]
        return ["input_ids", "attention_mask", "position_ids", *pasts]

    @property
    def output_names(self) -> list[str]:
        presents = [present_name(i, k) for i in range(self.layers) for k in ("key", "value")]
        return ["logits", *presents]


@dataclass
class _Attention:
    softmax: fx.Node
    mask_add: fx.Node  # the add of the model's own mask to the scores
    key: tuple[fx.Node, fx.Node]  # (the keys before the repeat, the node that reads them)
    value: tuple[fx.Node, fx.Node]
    # where(causal [1, 1, T, T], scores, min): a mask of T tokens only, which the cached
    # mask replaces; each with the scores it passes on
    wheres: list[tuple[fx.Node, fx.Node]]


def with_kv_cache(
    graph: fx.GraphModule, windows: list[int | None] | None = None, repeat_heads: bool = False
) -> tuple[fx.GraphModule, CacheLayout]:
    """A copy of the causal LM `graph` (inputs input_ids, attention_mask; logits out) with a
    key/value cache. `windows`: each attention layer's sliding window (None: full causal).
    `repeat_heads`: cache the keys and values after the grouped-query repeat (one head per
    query head), for runtimes that size a cache by attention heads."""
    gm = copy.deepcopy(graph)
    g = gm.graph
    placeholders = {n.name: n for n in g.nodes if n.op == "placeholder"}
    if set(placeholders) != {"input_ids", "attention_mask"}:
        raise ExportError(
            "a cached decoder is written from a graph that reads input_ids and attention_mask; "
            f"this one reads {', '.join(placeholders)}"
        )
    ids, mask = placeholders["input_ids"], placeholders["attention_mask"]
    length = _dim(ids, 1)
    attentions = [_attention(s, length, repeat_heads) for s in _attention_softmaxes(g, length)]
    if not attentions:
        raise ExportError(
            "found no attention in the student graph written as scores = q @ k^T + mask, "
            "softmax, @ v (Hugging Face's eager attention): a cached decoder needs it"
        )
    windows = windows or [None] * len(attentions)
    if len(windows) != len(attentions):
        raise ExportError(f"{len(windows)} attention windows for {len(attentions)} layers")
    _read_lengths_from_ids(g, mask, ids)
    with g.inserting_after(mask):
        positions = g.placeholder("position_ids")
    last: fx.Node = positions
    presents: list[fx.Node] = []
    first_past: fx.Node | None = None
    for i, attention in enumerate(attentions):
        for kind, (kept, reader) in (("key", attention.key), ("value", attention.value)):
            with g.inserting_after(last):
                last = past = g.placeholder(f"past_key_values_{i}_{kind}")
            first_past = first_past or past
            with g.inserting_after(kept):
                joined = g.call_function(aten.cat.default, ([past, kept], 2))
            reader.replace_input_with(kept, joined)
            _stop_reading_length(reader, attention.softmax, length)
            presents.append(joined)
        with g.inserting_before(attention.mask_add):
            new_mask = g.call_function(
                cached_attention_mask, (mask, ids, first_past, windows[i], _dtype(attention))
            )
        scores = next(
            a for a in attention.mask_add.args if isinstance(a, fx.Node) and _has_heads(a)
        )
        attention.mask_add.args = (scores, new_mask)  # the model's own mask: dead code now
        for where, passed in attention.wheres:
            where.replace_all_uses_with(passed)
    _feed_positions(g, positions, length)
    (logits,) = _leaves(output_node(gm))
    output_node(gm).args = ((logits, *presents),)
    eliminate_dead_code(gm)
    key = attentions[0].key[0].meta["val"]
    layout = CacheLayout(len(attentions), int(key.shape[1]), int(key.shape[3]))
    return gm, layout


def cached_attention_mask(
    attention_mask: torch.Tensor,
    input_ids: torch.Tensor,
    past_key: torch.Tensor,
    window: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The additive mask [B, 1, T, P + T] of T new tokens after P cached ones: a token sees
    the keys at or before its own place that `attention_mask` [B, P + T] keeps (within
    `window` places, when given), as Hugging Face's causal mask does."""
    past, new = past_key.shape[2], input_ids.shape[1]
    device = input_ids.device
    query = torch.arange(new, device=device) + past
    key = torch.arange(past + new, device=device)
    allowed = key[None, :] <= query[:, None]
    if window is not None:
        allowed = allowed & (key[None, :] > query[:, None] - window)
    allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _attention_softmaxes(g: fx.Graph, length: Any) -> list[fx.Node]:
    """Softmaxes over [B, H, T, T] scores (not a router's over experts)."""
    found = []
    for node in g.nodes:
        if node.op == "call_function" and node.target in SOFTMAXES:
            shape = _shape(node)
            if len(shape) == 4 and _same(shape[2], length) and _same(shape[3], length):
                found.append(node)
    return found


def _attention(softmax: fx.Node, length: Any, repeat_heads: bool) -> _Attention:
    where = f"attention at node {softmax.name!r}"
    node, mask_add = softmax.args[0], None
    wheres: list[tuple[fx.Node, fx.Node]] = []
    while isinstance(node, fx.Node) and node.target not in MATMULS:
        if node.op != "call_function" or node.target not in SCORE_OPS:
            raise ExportError(f"{where}: unexpected {node.target} between scores and softmax")
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        heads = [a for a in tensors if _has_heads(a)]
        if node.target is aten.add.Tensor and len(tensors) == 2 and len(heads) == 1:
            mask_add = node  # scores + mask [B or 1, 1, T, T]
        if node.target is aten.where.self and len(heads) == 1:
            wheres.append((node, heads[0]))
        if len(heads) != 1:
            raise ExportError(f"{where}: cannot follow the scores through {node.name!r}")
        node = heads[0]
    if mask_add is None or not isinstance(node, fx.Node):
        raise ExportError(f"{where}: no additive attention mask before the softmax")
    scores = node
    probs = softmax
    while True:
        users = [u for u in probs.users if u.target is not aten._assert_tensor_metadata.default]
        if len(users) == 1 and users[0].target in PROB_OPS:
            probs = users[0]
            continue
        break
    readers = [u for u in probs.users if u.target in MATMULS and u.args[0] is probs]
    if len(readers) != 1:
        raise ExportError(f"{where}: the probabilities are not multiplied by the values once")
    key_t = scores.args[1]
    assert isinstance(key_t, fx.Node)
    key = _before_repeat(key_t, scores, length, repeat_heads, transposed=True)
    value = _before_repeat(readers[0].args[1], readers[0], length, repeat_heads)  # type: ignore[arg-type]
    return _Attention(softmax, mask_add, key, value, wheres)


def _before_repeat(
    node: fx.Node, reader: fx.Node, length: Any, repeat_heads: bool, transposed: bool = False
) -> tuple[fx.Node, fx.Node]:
    """Walk back from the keys (or values) an attention matmul reads to where they are
    [B, kv_heads, T, head_dim] before any grouped-query repeat (`repeat_heads`: after it);
    returns that node and the node that reads it."""
    if transposed:  # k^T: the keys are what is transposed
        dims = {d for d in node.args[1:] if isinstance(d, int)}
        if node.target is not aten.transpose.int or dims not in ({-2, -1}, {2, 3}):
            raise ExportError(f"attention scores read {node.name!r}, not transposed keys")
        reader, node = node, node.args[0]  # type: ignore[assignment]
    while not repeat_heads and node.op == "call_function" and node.target in REPEAT_OPS:
        reader, node = node, node.args[0]  # type: ignore[assignment]
    shape = _shape(node)
    if len(shape) != 4 or not _same(shape[2], length):
        raise ExportError(
            f"keys or values at {node.name!r} are {tuple(shape)}, not [batch, heads, tokens, dim]"
        )
    return node, reader


def _stop_reading_length(reader: fx.Node, stop: fx.Node, length: Any) -> None:
    """The repeat ops between the cache and the attention matmul named the new tokens'
    length in their shapes: with the cache the length is past + new, so they read -1."""
    node: fx.Node | None = reader
    while node is not None and node.target in REPEAT_OPS | {aten.transpose.int}:
        if node.target in (aten.expand.default, aten.reshape.default, aten.view.default):
            shape = [-1 if _is_length(s, length) else s for s in node.args[1]]  # type: ignore[union-attr]
            node.args = (node.args[0], shape, *node.args[2:])
        users = list(node.users)
        node = users[0] if len(users) == 1 and users[0] is not stop else None


def _read_lengths_from_ids(g: fx.Graph, mask: fx.Node, ids: fx.Node) -> None:
    """Export reads the sequence length from whichever input has it; with a cache the
    attention mask is longer than the new tokens, so their count comes from input_ids."""
    for node in g.nodes:
        if node.target is aten.sym_size.int and node.args[0] is mask:
            node.args = (ids, *node.args[1:])


def _feed_positions(g: fx.Graph, positions: fx.Node, length: Any) -> None:
    """Replace the positions the model counts itself (arange over the new tokens, as
    [1, T]) by the position_ids input [B, T]."""
    counted = []
    for node in g.nodes:
        if node.target is not aten.unsqueeze.default or node.args[1] != 0:
            continue
        shape = _shape(node)
        if len(shape) == 2 and shape[0] == 1 and _same(shape[1], length) and _from_arange(node):
            counted.append(node)
    if not counted:
        raise ExportError(
            "found no position ids the model counts itself (arange over the tokens, "
            "unsqueezed to [1, T]): cannot feed the cached decoder's positions"
        )
    for node in counted:
        node.replace_all_uses_with(positions)


def _from_arange(node: fx.Node) -> bool:
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen or n.op != "call_function":
            continue
        seen.add(n)
        if n.target is aten.arange.default or n.target is aten.arange.start:
            return True
        todo.extend(a for a in n.args if isinstance(a, fx.Node))
    return False


def _dtype(attention: _Attention) -> torch.dtype:
    return attention.mask_add.meta["val"].dtype


def _leaves(out: fx.Node) -> list[fx.Node]:
    leaves = list(_flatten(out.args[0]))
    if len(leaves) != 1:
        raise ExportError(f"a cached decoder's graph returns the logits alone, not {len(leaves)}")
    return leaves


def _flatten(x: Any) -> Iterable[fx.Node]:
    if isinstance(x, fx.Node):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _flatten(v)
    elif isinstance(x, list | tuple):
        for v in x:
            yield from _flatten(v)


def _dim(node: fx.Node, i: int) -> Any:
    return node.meta["val"].shape[i]


def _shape(node: Any) -> tuple[Any, ...]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(getattr(val, "shape", ()))


def _has_heads(node: fx.Node) -> bool:
    """[B, H, T, T] scores rather than a mask broadcast over heads ([B or 1, 1, T, T])."""
    shape = _shape(node)
    return len(shape) == 4 and str(shape[1]) != "1"


def _same(a: Any, b: Any) -> bool:
    return str(a) == str(b)


def _is_length(arg: Any, length: Any) -> bool:
    return isinstance(arg, fx.Node) and _same(arg.meta.get("val"), length)
