"""`student_layers`: a smaller student of the teacher's own family (DistilBERT style).

The student starts as a copy of the teacher (`student: {from_teacher: true}`); this module
pass keeps the chosen transformer blocks (`layers: [0, 2, 4]`, `keep_every: 2`, or `keep: N`
chosen on the recipe's data), so the student inherits the teacher's embeddings, head,
tokenizer and those blocks' weights. With `hidden_size` the student is narrower instead:
same family and depth rule, fresh weights (feature losses then learn projections, which
stay out of the export).

`keep: N` ranks the blocks on calibration batches of the training data and keeps the N
that matter most, in their order:

- `select: auto` (= `kl_drop`): how far the model's output moves when the block alone is
  skipped: KL(full || without the block) per token for a causal LM or over classes for a
  classifier, 1 - cosine of the mean-pooled sentence embeddings for an encoder;
- `select: block_influence` (ShortGPT): 1 - cosine between a block's input and output
  hidden states, from one forward pass.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from compressor.api import ModulePass, ModulePassContext, hookimpl
from compressor.plugins.hf import HFModule, decoder_layers, hf_module, output_change, text_batches


class StudentLayersOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: list[int] | None = Field(None, description="teacher block indices to keep, in order")
    keep_every: int | None = Field(None, gt=0, description="keep blocks 0, k, 2k, ...")
    keep: int | None = Field(None, gt=0, description="keep the N blocks that matter most")
    select: Literal["auto", "kl_drop", "block_influence"] = Field(
        "auto", description="with keep: how blocks are ranked (auto = kl_drop)"
    )
    calibration_batches: int = Field(4, gt=0, description="with keep: training batches used")
    hidden_size: int | None = Field(None, gt=0, description="narrower student, fresh weights")
    intermediate_size: int | None = Field(None, gt=0)
    num_attention_heads: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_rule(self) -> StudentLayersOptions:
        rules = [self.layers is not None, self.keep_every is not None, self.keep is not None]
        if sum(rules) != 1:
            raise ValueError(
                "give exactly one of layers: [i, j, ...], keep_every: k or keep: N (chosen on "
                "the data)"
            )
        if self.keep is not None and self.hidden_size is not None:
            raise ValueError(
                "keep: N chooses teacher blocks to copy, and a narrow student (hidden_size) has "
                "fresh weights: give its depth with keep_every or layers"
            )
        return self


class StudentLayers(ModulePass[StudentLayersOptions]):
    """Keep chosen transformer blocks of a Hugging Face model (any family with a block list)."""

    name = "student_layers"

    def __call__(self, module: nn.Module, context: ModulePassContext) -> nn.Module:
        return self._rewrite(hf_module(module, "student_layers"), context)

    def _rewrite(self, module: HFModule, context: ModulePassContext) -> HFModule:
        o = self.options
        path, blocks = decoder_layers(module.hf_model)
        depth = len(blocks)
        if o.keep is not None:
            keep = self._choose(module, blocks, context)
        elif o.layers is not None:
            keep = o.layers
        else:
            keep = list(range(0, depth, o.keep_every or 1))
        bad = [i for i in keep if not 0 <= i < depth]
        if bad or not keep:
            raise ValueError(
                f"student_layers: layer {bad[0] if bad else keep} is not a layer of the teacher, "
                f"which has {depth} layers ({path}.0 to {path}.{depth - 1})"
            )
        config = module.config
        if o.hidden_size is not None:
            return _narrow(module, len(keep), o)
        parent_path, _, attr = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, attr, nn.ModuleList([blocks[i] for i in keep]))
        for new_index, block in enumerate(getattr(parent, attr)):
            for part in block.modules():  # attention of any family: its KV-cache slot
                if isinstance(getattr(part, "layer_idx", None), int):
                    part.layer_idx = new_index
        config.num_hidden_layers = len(keep)
        if getattr(config, "layer_types", None):
            config.layer_types = [config.layer_types[i] for i in keep]
        return module

    def _choose(
        self, module: HFModule, blocks: nn.ModuleList, context: ModulePassContext
    ) -> list[int]:
        o = self.options
        assert o.keep is not None
        if o.keep > len(blocks):
            raise ValueError(
                f"student_layers: keep {o.keep} of a teacher with {len(blocks)} blocks"
            )
        batches = text_batches(context, o.calibration_batches, "student_layers: keep: N")
        how = "kl_drop" if o.select == "auto" else o.select
        scores = rank_blocks(module, blocks, batches, how)
        keep = sorted(sorted(range(len(blocks)), key=lambda i: -scores[i])[: o.keep])
        ranking = ", ".join(
            f"{i}: {scores[i]:.4g}" for i in sorted(range(len(blocks)), key=lambda i: -scores[i])
        )
        context.notes.append(
            f"student_layers kept blocks {keep} of {len(blocks)} by {how} on "
            f"{len(batches)} batches of {len(batches[0]['input_ids'])}; most important first: "
            f"{ranking}"
        )
        return keep


def rank_blocks(
    module: HFModule, blocks: nn.ModuleList, batches: list[dict[str, torch.Tensor]], how: str
) -> list[float]:
    """The importance of every block (higher matters more), on `batches`."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            if how == "block_influence":
                return _block_influence(module, blocks, batches)
            scores = [0.0] * len(blocks)
            for x in batches:
                full, outputs = _recorded(module, blocks, x)
                for i, block in enumerate(blocks):
                    # the blocks before i see what they saw in the full pass: replay their
                    # outputs instead of computing them again (half the blocks, on average)
                    with _replayed(list(blocks)[:i], outputs[:i]), _skipping(block):
                        scores[i] += output_change(module.task, full, module(**x), x) / len(batches)
            return scores
    finally:
        module.train(was_training)


def _recorded(
    module: HFModule, blocks: nn.ModuleList, x: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, list[Any]]:
    """The model's output on `x` and each block's output on the way."""
    outputs: list[Any] = []
    handles = [b.register_forward_hook(lambda _b, _a, out: outputs.append(out)) for b in blocks]
    try:
        return module(**x), outputs
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _replayed(blocks: Sequence[nn.Module], outputs: list[Any]) -> Iterator[None]:
    """Each block returns its recorded output without computing (an instance `forward`)."""
    for block, out in zip(blocks, outputs, strict=True):
        block.forward = lambda *_args, _out=out, **_kwargs: _out
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


@contextlib.contextmanager
def _skipping(block: nn.Module) -> Iterator[None]:
    handle = block.register_forward_hook(_skipped, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _hidden_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _skipped(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    """A forward hook that makes a block the identity: its input goes on in place of its
    output (the rest of a tuple output, attention maps or caches, is kept)."""
    hidden = _hidden_in(args, kwargs)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _block_influence(
    module: HFModule, blocks: nn.ModuleList, batches: list[dict[str, torch.Tensor]]
) -> list[float]:
    sums = [0.0] * len(blocks)
    counts = [0] * len(blocks)
    mask: list[torch.Tensor] = []

    def recorder(i: int) -> Any:
        def hook(
            block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            cos = F.cosine_similarity(
                _hidden_in(args, kwargs).float(), _hidden_out(output).float(), dim=-1
            )
            sums[i] += float((1.0 - cos)[mask[0]].sum())
            counts[i] += int(mask[0].sum())

        return hook

    handles = [b.register_forward_hook(recorder(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for x in batches:
            mask[:] = [x["attention_mask"].bool()]
            module(**x)
    finally:
        for handle in handles:
            handle.remove()
    return [s / max(c, 1) for s, c in zip(sums, counts, strict=True)]


def _narrow(module: HFModule, depth: int, o: StudentLayersOptions) -> HFModule:
    """A fresh model of the same class with a smaller width (head size kept unless set)."""
    config = copy.deepcopy(module.config)
    head_dim = config.hidden_size // config.num_attention_heads
    assert o.hidden_size is not None
    heads = o.num_attention_heads or max(1, o.hidden_size // head_dim)
    if o.hidden_size % heads:
        raise ValueError(
            f"student_layers: hidden_size {o.hidden_size} is not a multiple of {heads} heads"
        )
    ratio = config.intermediate_size / config.hidden_size
    config.hidden_size = o.hidden_size
    config.num_attention_heads = heads
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = heads
    if hasattr(config, "head_dim"):
        config.head_dim = o.hidden_size // heads
    config.intermediate_size = o.intermediate_size or int(o.hidden_size * ratio)
    config.num_hidden_layers = depth
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:depth]
    model = type(module.hf_model)(config)
    return HFModule(model, module.task, module.tokenizer)


@hookimpl
def compressor_module_passes() -> list[type]:
    return [StudentLayers]
