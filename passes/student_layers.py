"""`student_layers`: a smaller student of the teacher's own family (DistilBERT style).

The student starts as a copy of the teacher (`student: {from_teacher: true}`); this module
pass keeps the chosen transformer blocks (`layers: [0, 2, 4]`, or `keep_every: 2`), so the
student inherits the teacher's embeddings, head, tokenizer and those blocks' weights. With
`hidden_size` the student is narrower instead: same family and depth rule, fresh weights
(feature losses then learn projections, which stay out of the export).
"""

from __future__ import annotations

import copy

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from compressor.hookspecs import hookimpl
from compressor.module_pass import ModulePass, ModulePassContext
from compressor.plugins.hf import HFModule, decoder_layers


class StudentLayersOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: list[int] | None = Field(None, description="teacher block indices to keep, in order")
    keep_every: int | None = Field(None, gt=0, description="keep blocks 0, k, 2k, ...")
    hidden_size: int | None = Field(None, gt=0, description="narrower student, fresh weights")
    intermediate_size: int | None = Field(None, gt=0)
    num_attention_heads: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_rule(self) -> StudentLayersOptions:
        if (self.layers is None) == (self.keep_every is None):
            raise ValueError("give exactly one of layers: [i, j, ...] or keep_every: k")
        return self


class StudentLayers(ModulePass[StudentLayersOptions]):
    """Keep chosen transformer blocks of a Hugging Face model (BERT, GPT-2, Llama family)."""

    name = "student_layers"

    def __call__(self, module: nn.Module, context: ModulePassContext) -> nn.Module:
        if not isinstance(module, HFModule):
            raise ValueError(
                f"student_layers needs a Hugging Face model (loader: hf), got {type(module).__name__}"
            )
        o = self.options
        path, blocks = decoder_layers(module.hf_model)
        depth = len(blocks)
        keep = o.layers if o.layers is not None else list(range(0, depth, o.keep_every or 1))
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
            for name in ("self_attn", "attn"):  # Llama family, GPT-2
                attention = getattr(block, name, None)
                if attention is not None and hasattr(attention, "layer_idx"):
                    attention.layer_idx = new_index  # KV-cache slot of this block
        config.num_hidden_layers = len(keep)
        if getattr(config, "layer_types", None):
            config.layer_types = [config.layer_types[i] for i in keep]
        return module


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
