"""A mixture-of-experts feed-forward block whose routing captures and exports.

`MoEBlock` routes each token to `top_k` of its experts: softmax over the router's logits,
the top k kept and (by default) renormalised to sum to 1, an optional shared expert added
through a sigmoid gate (Qwen2-MoE). Every expert runs on every token and the gates, zero
off the top k, weight their outputs: a static loop with no data-dependent shapes, so
torch.export captures it with dynamic batch and sequence and ONNX runs it as exported.
Hugging Face's own MoE blocks index the tokens each expert was given (`nonzero` over the
experts hit), which neither torch.export nor symbolic tracing can capture; `from_hf` turns
one of them into this block with the same weights and outputs.

Parameter names follow Qwen2-MoE (`gate`, `experts.{e}`, `shared_expert`,
`shared_expert_gate`), so an upcycled Llama or Qwen2 student saves as a Qwen2-MoE checkpoint
without renaming.

The helpers below say where an FFN's intermediate channels are (`channel_linears`) so that
`split` and `drop` can cut and re-initialise them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Linear):
    """The router of an `MoEBlock`: one logit per expert for each token (`@router_logits`)."""


class TopKGates(nn.Module):
    """[N, E] logits -> [N, E] gates, zero off each token's top k (`@router_gates`)."""

    def __init__(self, top_k: int, renormalize: bool):
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return route(logits, self.top_k, self.renormalize)


class MoEBlock(nn.Module):
    """Routed experts with dense gate masks: `[..., H] -> [..., H]`."""

    def __init__(
        self,
        gate: Router,
        experts: Iterable[nn.Module],
        top_k: int,
        renormalize: bool = True,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: nn.Linear | None = None,
        jitter: float = 0.0,
        tuple_output: bool = False,
    ):
        super().__init__()
        self.gate = gate
        self.experts = nn.ModuleList(experts)
        if not 1 <= top_k <= len(self.experts):
            raise ValueError(f"top_k {top_k} with {len(self.experts)} experts")
        self.route = TopKGates(top_k, renormalize)
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.jitter = jitter
        self.tuple_output = tuple_output  # (output, router logits), as Mixtral's layers expect

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def top_k(self) -> int:
        return self.route.top_k

    @property
    def renormalize(self) -> bool:
        return self.route.renormalize

    def idle_parameters(self) -> int:
        """Parameters a token does not use: the routed experts it is not sent to."""
        routed = sum(p.numel() for p in self.experts.parameters())
        return routed - routed * self.top_k // self.num_experts

    def forward(self, hidden_states: torch.Tensor) -> Any:
        routed_in = hidden_states
        if self.training and self.jitter > 0:  # Switch Transformer's multiplicative noise
            noise = torch.rand_like(hidden_states) * (2 * self.jitter) + (1 - self.jitter)
            routed_in = hidden_states * noise
        out, logits = mixture(self, hidden_states, routed_in)
        return (out, logits) if self.tuple_output else out


def mixture(block: Any, hidden_states: torch.Tensor, routed_in: torch.Tensor) -> Any:
    """(output [..., H], router logits [N, E]) of an MoE block of our parameter layout (an
    `MoEBlock`, or a Hugging Face block of the same names whose forward this replaces in
    ONNX export): every expert on every token, weighted by its gate."""
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    logits = block.gate(routed_in.reshape(-1, shape[-1]))
    if isinstance(block, MoEBlock):
        gates = block.route(logits).to(x.dtype)
    else:  # a Hugging Face block (ONNX export of a saved checkpoint)
        gates = route(logits, block.top_k, getattr(block, "norm_topk_prob", True)).to(x.dtype)
    out = gates[:, 0:1] * block.experts[0](x)
    for e in range(1, len(block.experts)):
        out = out + gates[:, e : e + 1] * block.experts[e](x)
    shared = getattr(block, "shared_expert", None)
    if shared is not None:
        out = out + torch.sigmoid(block.shared_expert_gate(x)) * shared(x)
    return out.reshape(shape), logits


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> torch.Tensor:
    """[N, E] gates: the softmax of the logits (in fp32) on each token's top k experts,
    renormalised to sum to 1 if asked, and 0 elsewhere."""
    probs = F.softmax(logits.float(), dim=-1)
    top, index = probs.topk(top_k, dim=-1)
    if renormalize:
        top = top / top.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, index, top)


def from_hf(block: Any, config: Any) -> MoEBlock:
    """The `MoEBlock` equal to a Hugging Face sparse MoE block (Qwen2-MoE, Qwen3-MoE,
    Mixtral and blocks of their shape): in transformers 4 a linear `gate` and an `experts`
    list, whose expert modules it shares; in transformers 5 a router with a `weight` and
    experts fused in 3-D tensors, which it splits into one `GatedExpert` each."""
    fused = _fused_layout(block)
    hf_gate = block.gate
    experts, out_features = (
        (split_experts(block.experts, type(block).__name__), hf_gate.weight.shape[0])
        if fused
        else (list(block.experts), hf_gate.out_features)
    )
    bias = getattr(hf_gate, "bias", None)
    gate = Router(hf_gate.weight.shape[1], out_features, bias=bias is not None)
    gate.to(hf_gate.weight.device, hf_gate.weight.dtype)
    gate.load_state_dict({"weight": hf_gate.weight, **({"bias": bias} if bias is not None else {})})
    router = hf_gate if fused else block
    top_k = int(getattr(router, "top_k", getattr(config, "num_experts_per_tok", 0)))
    # Mixtral always renormalises its top k; the Qwen MoE families say so in the config
    renormalize = bool(getattr(router, "norm_topk_prob", getattr(config, "norm_topk_prob", True)))
    if type(block).__name__.startswith("Mixtral"):
        renormalize = True
    return MoEBlock(
        gate,
        experts,
        top_k,
        renormalize,
        getattr(block, "shared_expert", None),
        getattr(block, "shared_expert_gate", None),
        jitter=float(getattr(block, "jitter_noise", 0.0)),
        tuple_output=not fused,  # transformers 4's layers read (output, router logits)
    )


class GatedExpert(nn.Module):
    """One expert of a fused Hugging Face experts module: down(act(gate(x)) * up(x)), three
    linears named as that family's per-expert checkpoints name them."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act: Any, names: tuple):
        super().__init__()
        self.names = names
        for name, linear in zip(names, (gate, up, down), strict=True):
            setattr(self, name, linear)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act(gate(x)) * up(x))


# per-expert linear names (gate, up, down) of the families' checkpoints
EXPERT_NAMES = {"Mixtral": ("w1", "w3", "w2")}
DEFAULT_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


def split_experts(experts: Any, block_type: str) -> list[nn.Module]:
    """transformers 5's fused experts (`gate_up_proj` [E, 2I, H], gate rows first;
    `down_proj` [E, H, I]) as one `GatedExpert` per expert, with copies of the weights."""
    if getattr(experts, "gate_up_proj_bias", None) is not None:
        raise ValueError(f"{block_type}: experts with biases are not split here")
    names = next((v for k, v in EXPERT_NAMES.items() if block_type.startswith(k)), None)
    names = names or DEFAULT_EXPERT_NAMES
    count, double, hidden = experts.gate_up_proj.shape
    width = double // 2
    split: list[nn.Module] = []
    for e in range(count):
        linears = [nn.Linear(hidden, width, bias=False) for _ in range(2)]
        linears.append(nn.Linear(width, hidden, bias=False))
        weights = (
            experts.gate_up_proj[e, :width],
            experts.gate_up_proj[e, width:],
            experts.down_proj[e],
        )
        for linear, weight in zip(linears, weights, strict=True):
            linear.to(weight.device, weight.dtype)
            linear.weight.data.copy_(weight.detach())
        gate, up, down = linears
        split.append(GatedExpert(gate, up, down, experts.act_fn, names))
    return split


def _fused_layout(block: Any) -> bool:
    experts = getattr(block, "experts", None)
    weight = getattr(getattr(block, "gate", None), "weight", None)
    return (
        isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
    )


def is_hf_moe_block(module: nn.Module) -> bool:
    """A Hugging Face sparse MoE block (by shape: a linear gate over an experts list, or in
    transformers 5 a router over fused expert tensors)."""
    experts = isinstance(getattr(module, "gate", None), nn.Linear) and isinstance(
        getattr(module, "experts", None), nn.ModuleList
    )
    return (
        not isinstance(module, MoEBlock)
        and (experts or _fused_layout(module))
        and "moe" in type(module).__name__.lower()
    )


def fused_expert_state(state: dict[str, torch.Tensor], target: dict[str, Any]) -> dict:
    """`state` (per-expert linears, as `MoEBlock`s hold them) with its experts fused where
    the `target` model's state dict has them fused (transformers 5): `{block}.experts.
    gate_up_proj` [E, 2I, H] and `{block}.experts.down_proj` [E, H, I]."""
    out = dict(state)
    for key in target:
        if not key.endswith(".experts.gate_up_proj") or key in state:
            continue
        prefix = key.removesuffix("gate_up_proj")
        names = next(
            (
                n
                for n in (*EXPERT_NAMES.values(), DEFAULT_EXPERT_NAMES)
                if f"{prefix}0.{n[0]}.weight" in state
            ),
            DEFAULT_EXPERT_NAMES,
        )
        count = sum(1 for k in state if k.startswith(prefix) and k.endswith(f".{names[0]}.weight"))
        per = [[out.pop(f"{prefix}{e}.{n}.weight") for n in names] for e in range(count)]
        out[key] = torch.stack([torch.cat([gate, up]) for gate, up, _ in per])
        out[prefix + "down_proj"] = torch.stack([down for _, _, down in per])
    return out


# -- where an FFN's intermediate channels are ----------------------------------------------------
_CHANNEL_NAMES = (
    (("gate_proj", "up_proj"), ("down_proj",)),  # Llama, Qwen2, Mistral, Gemma, ...
    (("w1", "w3"), ("w2",)),  # Mixtral experts
    (("up_proj",), ("down_proj",)),
    (("fc1",), ("fc2",)),
    (("dense_h_to_4h",), ("dense_4h_to_h",)),  # GPT-NeoX
)


def channel_linears(ffn: nn.Module) -> tuple[list[str], list[str]] | None:
    """(paths of the linears that make the intermediate channels, paths of those that read
    them), or None for an FFN of a shape not known here."""
    if isinstance(ffn, nn.Sequential) and len(ffn) >= 2:
        linears = [str(i) for i, m in enumerate(ffn) if isinstance(m, nn.Linear)]
        if len(linears) == 2:
            return [linears[0]], [linears[1]]
        inner = channel_linears(ffn[0])  # a BERT expert: (intermediate, output dense)
        if isinstance(ffn[-1], nn.Linear) and inner is None and _bert_intermediate(ffn[0]):
            return ["0.dense"], [str(len(ffn) - 1)]
        return None
    for ins, outs in _CHANNEL_NAMES:
        found = [getattr(ffn, n, None) for n in (*ins, *outs)]
        if all(isinstance(m, nn.Linear) for m in found):
            return list(ins), list(outs)
    return None


def _bert_intermediate(module: nn.Module) -> bool:
    return isinstance(getattr(module, "dense", None), nn.Linear) and hasattr(
        module, "intermediate_act_fn"
    )


def intermediate_size(ffn: nn.Module, channels: tuple[list[str], list[str]]) -> int:
    first = ffn.get_submodule(channels[0][0])
    assert isinstance(first, nn.Linear)
    return first.out_features


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def sliced_expert(
    ffn: nn.Module, channels: tuple[list[str], list[str]], keep: torch.Tensor, scale: float
) -> nn.Module:
    """A copy of `ffn` with only the intermediate channels `keep`, what they add to the
    output times `scale` (the reading linears' weights; their biases stay, as a block's gates
    sum to 1 and each expert then brings 1 of it in all)."""
    expert = copy.deepcopy(ffn)
    ins, outs = channels
    with torch.no_grad():
        for path in ins:
            old = ffn.get_submodule(path)
            assert isinstance(old, nn.Linear)
            new = nn.Linear(old.in_features, len(keep), bias=old.bias is not None)
            new.to(old.weight.device, old.weight.dtype)
            new.weight.copy_(old.weight[keep])
            if old.bias is not None:
                new.bias.copy_(old.bias[keep])
            _replace(expert, path, new)
        for path in outs:
            old = ffn.get_submodule(path)
            assert isinstance(old, nn.Linear)
            new = nn.Linear(len(keep), old.out_features, bias=old.bias is not None)
            new.to(old.weight.device, old.weight.dtype)
            new.weight.copy_(old.weight[:, keep] * scale)
            if old.bias is not None:
                new.bias.copy_(old.bias)
            _replace(expert, path, new)
    return expert


def scale_output(ffn: nn.Module, channels: tuple[list[str], list[str]], scale: float) -> None:
    """Multiply an FFN's output by `scale`, in its reading linears' weights and biases."""
    with torch.no_grad():
        for path in channels[1]:
            linear = ffn.get_submodule(path)
            assert isinstance(linear, nn.Linear)
            linear.weight.mul_(scale)
            if linear.bias is not None:
                linear.bias.mul_(scale)


def reinitialise_channels(
    ffn: nn.Module,
    channels: tuple[list[str], list[str]],
    index: torch.Tensor,
    generator: torch.Generator,
) -> None:
    """Drop-Upcycling: fresh weights for intermediate channels `index`, drawn from a normal
    with each linear's own mean and standard deviation (biases of those channels zeroed)."""
    with torch.no_grad():
        for axis, paths in ((0, channels[0]), (1, channels[1])):
            for path in paths:
                linear = ffn.get_submodule(path)
                assert isinstance(linear, nn.Linear)
                w = linear.weight
                mean, std = float(w.float().mean()), float(w.float().std())
                shape = (len(index), w.shape[1]) if axis == 0 else (w.shape[0], len(index))
                fresh = torch.randn(shape, generator=generator) * std + mean
                if axis == 0:
                    w[index] = fresh.to(w)
                    if linear.bias is not None:
                        linear.bias[index] = 0
                else:
                    w[:, index] = fresh.to(w)
