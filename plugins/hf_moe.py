"""Mixture-of-experts students as standard Hugging Face checkpoints, and their ONNX export.

A decoder whose FFNs `moe_upcycle` turned into `MoEBlock`s (a Llama, Qwen2, Mistral, ...
student) is saved as a Qwen2-MoE model: the layout holds routed experts, an optional
shared expert behind a sigmoid gate, and dense layers (`mlp_only_layers`) side by side, and
our parameter names are its own. What Qwen2-MoE has and the student lacks is filled so that
it changes nothing: zero q/k/v biases for a decoder without them, and a one-channel shared
expert of zero weights for a student without one. The converted model is run against the
student before it is saved, so a checkpoint that would load with other outputs is never
written. Hugging Face MoE models (Qwen2-MoE, Mixtral, ... after `moe_routing`) keep their
own layout and names and save as they are.

For ONNX, optimum's exporter gets a Qwen2-MoE configuration (it ships none) whose patch
runs each sparse block as the static loop over all experts that `MoEBlock` uses, so the
exported decoder has no data-dependent shapes.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from compressor.api import ExportError
from compressor.plugins.hf import decoder_layers
from compressor.plugins.moe_block import MoEBlock, fused_expert_state, mixture

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# what a Qwen2-MoE model has that a student may lack, filled so that it adds nothing
FILLED = (".self_attn.q_proj.bias", ".self_attn.k_proj.bias", ".self_attn.v_proj.bias")
KEPT_LAYOUTS = ("qwen2_moe", "qwen3_moe", "mixtral")  # already MoE models: saved as they are
# MoE families optimum-onnx's exporter has no configuration for: registered while it exports
UNKNOWN_TO_OPTIMUM_EXPORT = ("qwen2_moe", "mixtral")


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


def kv_heads(config: Any) -> int:
    """A Hugging Face config's key/value heads (its attention heads without grouping)."""
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def saved_model_type(model: Any) -> str:
    """The `model_type` `checkpoint_model` saves `model` as."""
    if moe_blocks(model) and model.config.model_type not in KEPT_LAYOUTS:
        return "qwen2_moe"
    return str(model.config.model_type)


def checkpoint_model(model: Any, repeat_kv_heads: bool = False) -> Any:
    """The model to save for a Hugging Face `model`: itself, or for a dense decoder with
    upcycled FFNs the Qwen2-MoE model with the same outputs. `repeat_kv_heads`: with a key
    and value head per query head (the same outputs, a larger cache), for a loader that
    sizes the cache of this family by its attention heads (optimum's ORTModelForCausalLM
    knows grouped-query attention only for the families it lists)."""
    config = model.config
    if saved_model_type(model) != config.model_type:
        return as_qwen2_moe(model, one_kv_head_per_query=repeat_kv_heads)
    if repeat_kv_heads and kv_heads(config) != config.num_attention_heads:
        return _one_kv_head_per_query_model(model)
    if moe_blocks(model):  # a Hugging Face MoE model after `moe_routing`
        return _native_moe_model(model)
    return model


def _native_moe_model(model: Any) -> Any:
    """A Hugging Face MoE model whose sparse blocks `moe_routing` swapped, with its own
    blocks back where this transformers stores experts otherwise (fused in transformers 5),
    so its checkpoint loads as the family's; the model itself where the names agree."""
    native = type(model)(copy.deepcopy(model.config)).to(model.lm_head.weight.device)
    target = native.state_dict()
    state = model.state_dict()
    if set(state) == set(target):
        return model
    native.load_state_dict(fused_expert_state(state, target))
    native.tie_weights()
    native.eval()
    _check_same_outputs(model, native, f"saving {model.config.model_type} with its own MoE blocks")
    return native


def _one_kv_head_per_query_model(model: Any) -> Any:
    """The same Hugging Face model with a key/value head per query head."""
    config = copy.deepcopy(model.config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    grouped = kv_heads(config)
    config.num_key_value_heads = heads
    weight = model.lm_head.weight
    expanded = type(model)(config).to(weight.device, weight.dtype)
    where = f"repeating the key/value heads of {config.model_type}"
    state = fused_expert_state(model.state_dict(), expanded.state_dict())
    state = _one_kv_head_per_query(state, expanded.state_dict(), (heads, grouped, head_dim), where)
    expanded.load_state_dict(state)
    expanded.tie_weights()
    expanded.eval()
    _check_same_outputs(model, expanded, where)
    return expanded


def as_qwen2_moe(model: Any, one_kv_head_per_query: bool = False) -> Any:
    """A `Qwen2MoeForCausalLM` with `model`'s weights and outputs (checked on a probe);
    `one_kv_head_per_query`: grouped key/value heads repeated, one per query head (the
    same outputs, a larger cache)."""
    import transformers

    config = model.config
    where = f"saving the MoE student ({config.model_type}) as a Qwen2-MoE checkpoint"
    if not isinstance(model, transformers.PreTrainedModel) or not hasattr(model, "lm_head"):
        raise ExportError(
            f"{where}: only causal language models save in the Qwen2-MoE layout; export "
            "this student with exporter 'onnx'"
        )
    path, layers = decoder_layers(model)
    sparse = [
        i for i, layer in enumerate(layers) if isinstance(getattr(layer, "mlp", None), MoEBlock)
    ]
    shape = _one_block_shape(path, [layers[k].mlp for k in sparse], sparse, where)
    heads, grouped = config.num_attention_heads, kv_heads(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    state = model.state_dict()
    repeat_kv = one_kv_head_per_query and grouped != heads
    moe_config = _qwen2_moe_config(
        config,
        len(layers),
        sparse,
        shape,
        heads if repeat_kv else grouped,
        head_dim,
    )
    weight = model.lm_head.weight
    converted = transformers.Qwen2MoeForCausalLM(moe_config).to(weight.device, weight.dtype)
    state = fused_expert_state(state, converted.state_dict())  # transformers 5's layout
    if repeat_kv:
        state = _one_kv_head_per_query(
            state, converted.state_dict(), (heads, grouped, head_dim), where
        )
    try:
        missing, unexpected = converted.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a parameter of another shape
        raise ExportError(f"{where}: {exc}") from None
    absent = [k for k in missing if not _fillable(k, shape[-1] == 0)]  # no shared expert
    if unexpected or absent:
        raise ExportError(
            f"{where}: the student's parameters do not map onto Qwen2-MoE's (Llama-style "
            f"attention and norms, gate/up/down FFNs without biases): "
            + "; ".join(
                part
                for part in (
                    f"not in Qwen2-MoE: {', '.join(unexpected[:4])}" if unexpected else "",
                    f"missing from the student: {', '.join(absent[:4])}" if absent else "",
                )
                if part
            )
        )
    with torch.no_grad():
        for key in missing:
            converted.get_parameter(key).zero_()
    converted.tie_weights()
    converted.eval()
    _check_same_outputs(model, converted, where)
    return converted


def _qwen2_moe_config(
    config: Any,
    depth: int,
    sparse: list[int],
    shape: tuple[int, int, bool, int, int],
    key_value_heads: int,
    head_dim: int,
) -> Any:
    """The Qwen2-MoE configuration of a decoder `config` whose layers `sparse` (of `depth`)
    hold MoE blocks of `shape` (experts, top k, renormalised, expert width, shared width)."""
    import transformers

    experts, top_k, renormalize, width, shared_width = shape
    window = getattr(config, "sliding_window", None)
    use_window = window is not None and getattr(config, "use_sliding_window", True)
    moe = transformers.Qwen2MoeConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=getattr(config, "intermediate_size", width),
        num_hidden_layers=depth,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=key_value_heads,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        attention_dropout=getattr(config, "attention_dropout", 0.0),
        use_sliding_window=bool(use_window),
        sliding_window=window if use_window else None,
        max_window_layers=depth,
        tie_word_embeddings=config.tie_word_embeddings,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=renormalize,
        moe_intermediate_size=width,
        shared_expert_intermediate_size=shared_width or 1,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(depth) if i not in sparse],
        qkv_bias=True,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    moe.head_dim = head_dim
    # rotary settings: `rope_parameters` in transformers 5, `rope_theta`/`rope_scaling` in 4
    for name in ("rope_parameters", "rope_theta", "rope_scaling"):
        if hasattr(config, name):
            setattr(moe, name, getattr(config, name))
    return moe


def _one_kv_head_per_query(
    state: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    heads: tuple[int, int, int],
    where: str,
) -> dict[str, torch.Tensor]:
    """`state` reshaped to `target`'s shapes by repeating each key/value head for the query
    heads it serves (transformers' repeat_kv order: query head h reads kv head h // repeat).
    `heads`: (query heads, key/value heads, head size). Found by shape, so it covers separate
    k/v projections, norms over all key heads (OLMo-2's k_norm) and fused q/k/v projections
    (Phi-3's qkv_proj: query rows, then key rows, then value rows)."""
    query, kv, size = heads
    repeat = query // kv
    out = dict(state)
    for key, value in state.items():
        want = target[key].shape if key in target else value.shape
        if value.shape == want:
            continue
        if value.shape[0] == (query + 2 * kv) * size and want[0] == 3 * query * size:
            q, k, v = value.split([query * size, kv * size, kv * size])
            out[key] = torch.cat(
                [q, _repeat_heads(k, repeat, size), _repeat_heads(v, repeat, size)]
            )
        elif value.shape[0] * repeat == want[0] and value.shape[0] % size == 0:
            out[key] = _repeat_heads(value, repeat, size)
        else:
            raise ExportError(
                f"{where}: {key} is {list(value.shape)}, and no key/value-head layout makes it "
                f"{list(want)}"
            )
    return out


def _repeat_heads(value: torch.Tensor, repeat: int, size: int) -> torch.Tensor:
    """Rows of heads of `size`, each head repeated `repeat` times in place."""
    heads = value.reshape(-1, size, *value.shape[1:])
    return heads.repeat_interleave(repeat, dim=0).reshape(-1, *value.shape[1:])


def _one_block_shape(
    path: str, blocks: list[MoEBlock], indices: list[int], where: str
) -> tuple[int, int, bool, int, int]:
    """The shape every MoE block shares (a Qwen2-MoE checkpoint has one for all)."""
    shape = _block_shape(blocks[0], where, f"{path}.{indices[0]}.mlp")
    for i, block in zip(indices[1:], blocks[1:], strict=True):
        if _block_shape(block, where, f"{path}.{i}.mlp") != shape:
            raise ExportError(
                f"{where}: {path}.{i}.mlp has {_block_shape(block, where, '')} (experts, top k, "
                f"renormalised, expert width, shared width) and {path}.{indices[0]}.mlp has "
                f"{shape}; a Qwen2-MoE checkpoint has one shape for all its MoE blocks"
            )
    return shape


def _block_shape(block: MoEBlock, where: str, label: str) -> tuple[int, int, bool, int, int]:
    """(experts, top k, renormalised, expert width, shared expert width or 0)."""
    widths = {_expert_width(e, where, label) for e in block.experts}
    if len(widths) > 1:
        raise ExportError(f"{where}: the experts of {label} have widths {sorted(widths)}")
    shared = block.shared_expert
    shared_width = _expert_width(shared, where, f"{label}.shared_expert") if shared else 0
    return block.num_experts, block.top_k, block.renormalize, widths.pop(), shared_width


def _expert_width(expert: nn.Module, where: str, label: str) -> int:
    parts = [getattr(expert, name, None) for name in EXPERT_PROJECTIONS]
    if not all(isinstance(p, nn.Linear) and p.bias is None for p in parts):
        raise ExportError(
            f"{where}: {label} is a {type(expert).__name__}; Qwen2-MoE experts are gate_proj, "
            "up_proj and down_proj linears without biases (a Llama-style FFN)"
        )
    assert isinstance(parts[0], nn.Linear)
    return parts[0].out_features


def _fillable(key: str, no_shared_expert: bool) -> bool:
    return key.endswith(FILLED) or (no_shared_expert and ".mlp.shared_expert" in key)


def _check_same_outputs(model: Any, converted: Any, where: str) -> None:
    device = model.lm_head.weight.device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=generator).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = model(input_ids=ids).logits.float()
            got = converted(input_ids=ids).logits.float()
    finally:
        model.train(was_training)
    diff = float((got - want).abs().max())
    scale = float(want.abs().max())
    if diff > 1e-4 * max(1.0, scale):
        raise ExportError(
            f"{where}: the saved model's logits differ from the student's by {diff:.3g} "
            f"(largest logit {scale:.3g}); the checkpoint was not written"
        )


# -- ONNX export through optimum ----------------------------------------------------------------
def _export_forward(self: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, Any]:
    return mixture(self, hidden_states, hidden_states)


@contextlib.contextmanager
def export_safe_moe() -> Iterator[None]:
    """While optimum exports: a Qwen2-MoE configuration registered, and Hugging Face sparse
    MoE blocks running the static loop over all experts (no data-dependent shapes)."""
    from optimum.exporters.onnx.model_configs import LlamaOnnxConfig
    from optimum.exporters.tasks import TasksManager
    from optimum.utils import NormalizedTextConfigWithGQA
    from transformers.models.mixtral import modeling_mixtral
    from transformers.models.qwen2_moe import modeling_qwen2_moe

    class MoEDecoderOnnxConfig(LlamaOnnxConfig):
        NORMALIZED_CONFIG_CLASS = NormalizedTextConfigWithGQA

    register = TasksManager.create_register("onnx")
    for family in UNKNOWN_TO_OPTIMUM_EXPORT:
        if family not in TasksManager._SUPPORTED_MODEL_TYPE:
            register(family, "text-generation", "text-generation-with-past")(MoEDecoderOnnxConfig)

    classes: tuple[Any, ...] = (
        modeling_qwen2_moe.Qwen2MoeSparseMoeBlock,
        modeling_mixtral.MixtralSparseMoeBlock,
    )
    originals = [cls.forward for cls in classes]
    for cls in classes:
        cls.forward = _export_forward
    try:
        yield
    finally:
        for cls, forward in zip(classes, originals, strict=True):
            cls.forward = forward
