"""A causal LM's Hugging Face folder: its cached decoder written from the student graph and
checked by greedy generation, in onnxruntime and, where optimum is installed, in optimum's
ORTModelForCausalLM as users load it.

The decoder is the graph the run trained, with a key/value cache added (`kv_cache`), so
whatever a graph pass changed in the student is in the file. Checks, each against the
student graph recomputing whole sequences in PyTorch:
- logits of the verification batches through the decoder with an empty cache;
- GREEDY_TOKENS greedy tokens after a prompt, each step feeding the cache back: the logits
  of every step, and whether each chosen token is PyTorch's (a near tie counts as agreed);
- with optimum: the folder loaded by ORTModelForCausalLM with its defaults generates the
  same tokens.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import fx

from compressor.api import Inputs, call_model, output_node, to_device
from compressor.plugins.hf import HFModule
from compressor.plugins.hf_moe import export_safe_moe
from compressor.plugins.kv_cache import with_kv_cache
from compressor.plugins.onnx_export import quiet
from compressor.plugins.ort_decoder import OrtDecoder, write_cached_decoder

GREEDY_TOKENS = 32
PROMPT_TOKENS = 16


def write_decoder(
    module: HFModule,
    graph: fx.GraphModule,
    path: Path,
    opset: int | None,
    repeat_heads: bool = False,
) -> dict[str, Any]:
    """The student graph with a cache, as `path`; returns what was written."""
    windows = attention_windows(module.hf_model.config)
    cached, layout = with_kv_cache(graph, windows, repeat_heads)
    vocab = int(output_node(graph).args[0].meta["val"].shape[-1])  # type: ignore[union-attr]
    write_cached_decoder(cached, layout, vocab, path, opset)
    return {
        "inputs": layout.input_names,
        "cache": f"{layout.layers} layers x {layout.kv_heads} key/value heads x "
        f"{layout.head_dim} (written from the student graph)",
    }


def attention_windows(config: Any) -> list[int | None] | None:
    """Each attention layer's sliding window (None: all causal), as the config says."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types is None:
        return [int(window)] * int(config.num_hidden_layers)
    return [int(window) if t == "sliding_attention" else None for t in types]


def check_decoder(
    path: Path, graph: fx.GraphModule, verify_inputs: list[tuple[Inputs, ...]], eos: list[int]
) -> dict[str, Any]:
    """The decoder at `path` against the student graph (see the module's doc)."""
    decoder = OrtDecoder(path)
    diffs = []
    for inputs in verify_inputs:
        x = to_device(inputs[0], torch.device("cpu"))
        assert isinstance(x, dict)
        got = torch.from_numpy(decoder.prompt_logits(x["input_ids"], x["attention_mask"]))
        with torch.no_grad():
            want = call_model(graph, x).float().cpu()
        real = x["attention_mask"].bool()  # padding's logits are nobody's
        diffs.append(float((got.float() - want).abs()[real].max()))
    prompt = first_prompt(verify_inputs)
    tokens, logits = decoder.greedy(prompt, torch.ones_like(prompt), GREEDY_TOKENS, eos)
    cached, agreed = _agreement(graph, prompt, tokens, logits, eos)
    return {
        "onnxruntime_max_abs_diff": max(diffs),
        "cached_generation_max_abs_diff": cached,
        "greedy_tokens_equal": f"{agreed} of {GREEDY_TOKENS}",
        "greedy_tokens": tokens[0].tolist(),
    }


def first_prompt(verify_inputs: list[tuple[Inputs, ...]]) -> torch.Tensor:
    """The greedy checks' prompt: the last verification batch's first sequence, its first
    PROMPT_TOKENS real tokens."""
    inputs = verify_inputs[-1][0]
    assert isinstance(inputs, dict)
    ids, mask = inputs["input_ids"][:1].cpu(), inputs["attention_mask"][:1].cpu()
    length = min(PROMPT_TOKENS, int(mask.sum()))
    return ids[:, :length]


def _agreement(
    graph: fx.GraphModule,
    prompt: torch.Tensor,
    tokens: torch.Tensor,
    logits: torch.Tensor,
    banned: list[int],
) -> tuple[float, int]:
    """The largest logit difference over the cached steps against one causal pass of the
    graph over the whole sequence, and at how many steps PyTorch's greedy token (with the
    same ids banned) is the one chosen; a near tie (top-2 gap within twice that difference,
    where either choice is right) counts as agreed."""
    sequence = torch.cat([prompt, tokens], dim=1)[:, :-1]
    with torch.no_grad():
        want = call_model(
            graph, {"input_ids": sequence, "attention_mask": torch.ones_like(sequence)}
        )
    want = want[0, prompt.shape[1] - 1 :].float().cpu()  # [steps, V]
    diff = float((logits[0] - want).abs().max())
    allowed = want.clone()
    allowed[:, [i for i in banned if i < allowed.shape[-1]]] = float("-inf")
    top2 = allowed.topk(2, dim=-1).values
    near_tie = (top2[:, 0] - top2[:, 1]) <= 2 * diff
    agreed = int(((allowed.argmax(-1) == tokens[0]) | near_tie).sum())
    return diff, agreed


def optimum_model(folder: Path) -> Any:
    """The folder loaded as users load it, optimum's ORTModelForCausalLM with its defaults
    (None: optimum is not installed)."""
    try:
        from optimum.onnxruntime import ORTModelForCausalLM
    except ImportError:
        return None
    with quiet_optimum(), export_safe_moe():
        return ORTModelForCausalLM.from_pretrained(str(folder), local_files_only=True)


def optimum_generation(model: Any, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """The greedy tokens optimum's `model` generates after `prompt`."""
    with quiet_optimum(), torch.no_grad():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.config.pad_token_id or 0,
        )
    return out[0, prompt.shape[1] :].tolist()


def quiet_optimum() -> contextlib.AbstractContextManager[None]:
    """optimum prints and warns a lot; what it gives is checked instead."""
    return quiet("optimum", "transformers", stderr=True)


def eos_ids(module: HFModule) -> list[int]:
    """The end-of-sequence ids greedy checks never choose, so they run a fixed length."""
    eos = getattr(module.hf_model.generation_config, "eos_token_id", None)
    return [eos] if isinstance(eos, int) else list(eos or [])
