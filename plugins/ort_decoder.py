"""A cached decoder as an ONNX file: written from the cached graph, run greedily in
onnxruntime with its cache, the way a Hugging Face runtime runs it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.export import Dim

from compressor.plugins.kv_cache import CacheLayout
from compressor.plugins.onnx_export import ort_session, quiet, state_bytes


def example_cache_inputs(layout: CacheLayout, vocab: int) -> tuple[torch.Tensor, ...]:
    """Inputs to trace the cached graph with: 2 sequences, 3 new tokens after 5 cached (no
    size 0 or 1, which export would fix as constants)."""
    batch, new, past = 2, 3, 5
    ids = torch.randint(0, vocab, (batch, new), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, past + new, dtype=torch.long)
    positions = torch.arange(past, past + new).expand(batch, new).contiguous()
    cache = [
        torch.zeros(batch, layout.kv_heads, past, layout.head_dim) for _ in range(2 * layout.layers)
    ]
    return (ids, mask, positions, *cache)


def write_cached_decoder(
    graph: fx.GraphModule, layout: CacheLayout, vocab: int, path: Path, opset: int | None
) -> None:
    """The cached graph as ONNX with Hugging Face's input and output names, batch, token,
    cache and mask lengths dynamic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    batch, new, past = Dim("batch"), Dim.AUTO, Dim.AUTO
    pasts = [{0: batch, 2: past} for _ in range(2 * layout.layers)]
    dynamic = ({0: batch, 1: new}, {0: batch, 1: Dim.AUTO}, {0: batch, 1: new}, *pasts)
    with quiet("torch.onnx"):
        torch.onnx.export(
            graph,
            example_cache_inputs(layout, vocab),
            str(path),
            dynamo=True,
            dynamic_shapes=dynamic,
            input_names=layout.input_names,
            output_names=layout.output_names,
            opset_version=opset,
            external_data=state_bytes(graph) > 1.5 * 2**30,
            verbose=False,
        )


class OrtDecoder:
    """An ONNX cached decoder in onnxruntime."""

    def __init__(self, path: Path, providers: list[str] | None = None) -> None:
        self.session = ort_session(path, providers)
        inputs = self.session.get_inputs()
        self.names = [i.name for i in inputs]
        self.caches = [(i.name, i.shape[1], i.shape[3]) for i in inputs if "past" in i.name]

    @staticmethod
    def is_decoder(path: Path) -> bool:
        names = [i.name for i in ort_session(path).get_inputs()]
        return any(n.startswith("past_key_values") for n in names)

    def prompt_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        """Logits [B, T, V] of prompts with an empty cache."""
        return self._run(ids, mask, _positions(mask), self._empty(ids.shape[0]))[0]

    def greedy(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        new_tokens: int,
        banned: Sequence[int] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`new_tokens` greedy tokens after each prompt (left-padded), each step feeding the
        cache back: the tokens [B, new] and each step's logits [B, new, V]. `banned`: ids never
        chosen (end of sequence, when a fixed count is wanted)."""
        positions = _positions(mask)
        out = self._run(ids, mask, positions, self._empty(ids.shape[0]))
        chosen, logits = [], []
        for _ in range(new_tokens):
            last = torch.from_numpy(out[0][:, -1]).float()
            logits.append(last)
            pick = last.clone()
            pick[:, [b for b in banned if b < pick.shape[-1]]] = float("-inf")
            token = pick.argmax(-1, keepdim=True)
            chosen.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            positions = positions[:, -1:] + 1
            out = self._run(token, mask, positions, out[1:])
        return torch.cat(chosen, dim=1), torch.stack(logits, dim=1)

    def tokens_per_second(self, ids: torch.Tensor, new_tokens: int) -> float:
        """Greedy tokens per second after one prompt, after one untimed warm-up."""
        mask = torch.ones_like(ids)
        self.greedy(ids, mask, 2)
        began = time.perf_counter()
        self.greedy(ids, mask, new_tokens)
        return new_tokens / (time.perf_counter() - began)

    def _empty(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, heads, 0, dim), np.float32) for _, heads, dim in self.caches]

    def _run(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> list[np.ndarray]:
        feeds = {
            "input_ids": ids.numpy(),
            "attention_mask": mask.numpy(),
            "position_ids": positions.numpy(),
        }
        feeds |= {name: c for (name, _, _), c in zip(self.caches, cache, strict=True)}
        return self.session.run(None, {k: v for k, v in feeds.items() if k in self.names})


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Each token's place among its row's real tokens (padding reads 0), as HF counts."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
