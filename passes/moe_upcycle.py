"""`moe_upcycle`: dense FFN blocks become routed experts (sparse upcycling, LLaVA-MoD).

Each chosen feed-forward block is replaced by an `MoEBlock` of `experts` experts built from
it, routed `top_k` per token:

- `init: copy`: every expert an exact copy (sparse upcycling; LLaVA-MoD). The gates of a
  token sum to 1, so the block's output equals the dense FFN's for any routing;
- `init: drop`: copies, then `drop_ratio` of each expert's intermediate channels (a
  different draw per expert) re-initialised from the weights' own statistics
  (Drop-Upcycling), so the experts start diverse;
- `init: split`: the intermediate channels partitioned among the experts (LLaMA-MoE), each
  expert's output scaled by `experts`; with every expert active and uniform gates the block
  is the dense FFN, and with top_k < experts a token's active FFN parameters are
  top_k / experts of the dense block's;
- `shared_expert: true`: also a full copy of the FFN outside the routing, behind a sigmoid
  gate that starts at 0.5 (Qwen2-MoE), with the routed experts' output halved so that the
  sum still equals the dense FFN.

The router is a linear layer, `random` (normal, `router_std`) or `calibration` (k-means
centroids of the FFN's inputs on training batches, scaled to unit-spread logits). FFNs are
found in each transformer block of a Hugging Face model (`layers`): its `mlp` (Llama,
Qwen2, Mistral, ... any module), or BERT's `intermediate` + `output.dense`. Other models
name the FFN modules (`modules`): any module from hidden states to hidden states.

`moe_routing` swaps Hugging Face sparse MoE blocks (Qwen2-MoE, Qwen3-MoE, Mixtral) for the
same export-safe block, so such models capture as teachers and students.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from compressor.api import (
    DataBundle,
    ModulePass,
    ModulePassContext,
    Problem,
    Recipe,
    call_model,
    hookimpl,
)
from compressor.plugins.hf import HFModule, decoder_layers
from compressor.plugins.moe_block import (
    MoEBlock,
    Router,
    channel_linears,
    from_hf,
    intermediate_size,
    is_hf_moe_block,
    reinitialise_channels,
    scale_output,
    sliced_expert,
)

LayerRule = Literal["every_other", "first_half", "second_half", "all"]
# (label, parent module, attribute names, the FFN as one module) of a chosen FFN
Site = tuple[str, nn.Module, tuple[str, ...], nn.Module]


class MoEUpcycleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    experts: int = Field(4, ge=2, description="experts per MoE block")
    top_k: int = Field(2, ge=1, description="experts each token is routed to")
    layers: LayerRule | list[int] = Field(
        "every_other",
        description="which transformer blocks get experts: every_other (1, 3, 5, ...), "
        "first_half, second_half, all, or a list of block indices",
    )
    modules: list[str] | None = Field(
        None, description="module paths of the FFNs, for models without transformer blocks"
    )
    init: Literal["copy", "drop", "split"] = "copy"
    drop_ratio: float = Field(0.5, gt=0, lt=1, description="with init: drop")
    shared_expert: bool = False
    router_init: Literal["random", "calibration"] = "random"
    router_std: float = Field(
        0.02, ge=0, description="with router_init: random (0: uniform gates at the start)"
    )
    calibration_batches: int = Field(4, gt=0)
    jitter: float = Field(0.0, ge=0, lt=1, description="router input noise in training")
    renormalize: bool = Field(True, description="the top k gates renormalised to sum to 1")
    seed: int = Field(0, description="for the router, drop and calibration draws")

    @model_validator(mode="after")
    def _consistent(self) -> MoEUpcycleOptions:
        if self.top_k > self.experts:
            raise ValueError(
                f"top_k {self.top_k} is more than the {self.experts} experts: each token is "
                f"routed to top_k of them (1 to {self.experts})"
            )
        if self.modules is not None and self.modules == []:
            raise ValueError("modules is empty: name at least one FFN module path")
        return self


class MoEUpcycle(ModulePass[MoEUpcycleOptions]):
    """Turn chosen FFN blocks into routed experts (copy, drop or split initialisation)."""

    name = "moe_upcycle"

    def __call__(self, module: nn.Module, context: ModulePassContext) -> nn.Module:
        o = self.options
        sites = self._sites(module)
        generator = torch.Generator().manual_seed(o.seed)
        routers_from = (
            self._calibration(module, sites, context) if o.router_init == "calibration" else None
        )
        for n, (label, parent, names, ffn) in enumerate(sites):
            centroids = routers_from[n] if routers_from is not None else None
            block = self._block(label, ffn, generator, centroids)
            setattr(parent, names[0], block)
            if len(names) == 2:  # BERT: the output's dense layer moved into the experts
                getattr(parent, names[1]).dense = nn.Identity()
        total, active = parameter_counts(module)
        context.notes.append(
            f"moe_upcycle: {len(sites)} FFN block(s) ({', '.join(s[0] for s in sites)}) became "
            f"{o.experts} experts, top {o.top_k} ({o.init}"
            f"{', shared expert' if o.shared_expert else ''}); parameters {total:,} in all, "
            f"{active:,} active per token"
        )
        return module

    def _sites(self, module: nn.Module) -> list[Site]:
        """(label, parent module, attribute names, FFN as one module) of every chosen FFN."""
        o = self.options
        sites: list[Site] = []
        if o.modules is not None:
            for path in o.modules:
                try:
                    ffn = module.get_submodule(path)
                except AttributeError:
                    raise ValueError(f"moe_upcycle: the model has no module {path!r}") from None
                parent_path, _, attr = path.rpartition(".")
                sites.append((path, module.get_submodule(parent_path), (attr,), ffn))
            return sites
        if not isinstance(module, HFModule):
            raise ValueError(
                f"moe_upcycle finds FFNs in the transformer blocks of a Hugging Face model; "
                f"this is a {type(module).__name__}: name its FFN modules with modules: [path, ...]"
            )
        path, blocks = decoder_layers(module.hf_model)
        depth = len(blocks)
        chosen = _layers(o.layers, depth)
        bad = [i for i in chosen if not 0 <= i < depth]
        if bad:
            raise ValueError(
                f"moe_upcycle: layer {bad[0]} is not a layer of the model, which has {depth} "
                f"({path}.0 to {path}.{depth - 1})"
            )
        for i in chosen:
            block, label = blocks[i], f"{path}.{i}"
            mlp = getattr(block, "mlp", None)
            intermediate, output = (
                getattr(block, "intermediate", None),
                getattr(block, "output", None),
            )
            if mlp is not None and (isinstance(mlp, MoEBlock) or is_hf_moe_block(mlp)):
                raise ValueError(f"moe_upcycle: {label}.mlp is already a mixture of experts")
            if isinstance(mlp, nn.Module):
                sites.append((f"{label}.mlp", block, ("mlp",), mlp))
            elif isinstance(intermediate, nn.Module) and isinstance(
                getattr(output, "dense", None), nn.Linear
            ):
                assert output is not None
                ffn = nn.Sequential(intermediate, output.dense)
                sites.append((f"{label}.intermediate", block, ("intermediate", "output"), ffn))
            else:
                children = ", ".join(name for name, _ in block.named_children())
                raise ValueError(
                    f"moe_upcycle: layer {i} ({label}) has no FFN this pass knows (an `mlp`, or "
                    f"BERT's `intermediate` and `output.dense`); its parts are: {children}"
                )
        return sites

    def _block(
        self,
        label: str,
        ffn: nn.Module,
        generator: torch.Generator,
        centroids: torch.Tensor | None,
    ) -> MoEBlock:
        o = self.options
        channels = channel_linears(ffn)
        if channels is None and (o.init != "copy" or o.shared_expert):
            what = f"init: {o.init}" if o.init != "copy" else "shared_expert"
            raise ValueError(
                f"moe_upcycle: {what} cuts or scales the FFN's intermediate channels, and "
                f"{label} ({type(ffn).__name__}) is not an FFN of a known shape (gate/up/down "
                "projections, fc1/fc2, BERT's intermediate and output, or a Sequential of two "
                "Linears); use init: copy without a shared expert"
            )
        width = intermediate_size(ffn, channels) if channels is not None else 0
        experts: list[nn.Module]
        if o.init == "split":
            assert channels is not None
            if width % o.experts:
                raise ValueError(
                    f"moe_upcycle: init: split partitions the {width} intermediate channels of "
                    f"{label} among {o.experts} experts, which does not divide them; choose "
                    f"experts that divide {width}"
                )
            order = torch.randperm(width, generator=generator)
            parts = order.reshape(o.experts, -1).sort(dim=1).values
            experts = [sliced_expert(ffn, channels, part, float(o.experts)) for part in parts]
        else:
            experts = [copy.deepcopy(ffn) for _ in range(o.experts)]
            if o.init == "drop":
                assert channels is not None
                count = max(1, round(o.drop_ratio * width))
                for expert in experts:
                    index = torch.randperm(width, generator=generator)[:count]
                    reinitialise_channels(expert, channels, index, generator)
        weight: torch.Tensor = next(ffn.parameters())
        if channels is not None:
            first = ffn.get_submodule(channels[0][0])
            assert isinstance(first, nn.Linear)
            weight = first.weight
        hidden = int(weight.shape[1]) if channels else _hidden_size(ffn)
        gate = Router(hidden, o.experts, bias=False)
        with torch.no_grad():
            if centroids is not None:
                gate.weight.copy_(centroids)
            else:
                gate.weight.copy_(
                    torch.randn(o.experts, hidden, generator=generator) * o.router_std
                )
        gate.to(weight.device, weight.dtype)
        shared = shared_gate = None
        if o.shared_expert:
            assert channels is not None
            for expert in experts:
                scale_output(expert, channels, 0.5)
            shared = copy.deepcopy(ffn)
            shared_gate = nn.Linear(hidden, 1, bias=False).to(weight.device, weight.dtype)
            nn.init.zeros_(shared_gate.weight)  # sigmoid(0) = 0.5: half of the dense FFN
        return MoEBlock(gate, experts, o.top_k, o.renormalize, shared, shared_gate, o.jitter)

    def _calibration(
        self,
        module: nn.Module,
        sites: list[Site],
        context: ModulePassContext,
    ) -> list[torch.Tensor]:
        """Per site: router weights [E, H] from k-means on the FFN's inputs."""
        o = self.options
        device = next(module.parameters()).device
        batches = context.training_batches(
            o.calibration_batches, "moe_upcycle: router_init: calibration", device
        )
        inputs: list[list[torch.Tensor]] = [[] for _ in sites]
        # BERT's FFN is a Sequential(intermediate, output dense): record the intermediate's input
        ffn_modules = [s[3].get_submodule("0") if len(s[2]) == 2 else s[3] for s in sites]

        def recorder(n: int) -> Any:
            def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0]
                inputs[n].append(x.detach().reshape(-1, x.shape[-1]).float().cpu())

            return hook

        handles = [m.register_forward_pre_hook(recorder(n)) for n, m in enumerate(ffn_modules)]
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                for x in batches:
                    call_model(module, x)
        finally:
            for handle in handles:
                handle.remove()
            module.train(was_training)
        generator = torch.Generator().manual_seed(o.seed)
        return [_kmeans_router(torch.cat(xs), o.experts, generator) for xs in inputs]


def _hidden_size(ffn: nn.Module) -> int:
    linears = [m for m in ffn.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"moe_upcycle: {type(ffn).__name__} has no linear layer to size a router by"
        )
    return linears[0].in_features


def _layers(rule: LayerRule | list[int], depth: int) -> list[int]:
    if isinstance(rule, list):
        return rule
    return {
        "every_other": list(range(1, depth, 2)),
        "first_half": list(range(depth // 2)),
        "second_half": list(range(depth // 2, depth)),
        "all": list(range(depth)),
    }[rule]


def _kmeans_router(x: torch.Tensor, experts: int, generator: torch.Generator) -> torch.Tensor:
    """Router weights [E, H]: spherical k-means centroids of tokens `x` [N, H] (up to 4096
    of them), scaled so the logits on those tokens have unit standard deviation."""
    if len(x) > 4096:
        x = x[torch.randperm(len(x), generator=generator)[:4096]]
    if len(x) < experts:
        raise ValueError(
            f"moe_upcycle: router_init: calibration saw {len(x)} tokens, fewer than the "
            f"{experts} experts"
        )
    unit = F.normalize(x, dim=-1)
    centroids = unit[torch.randperm(len(unit), generator=generator)[:experts]].clone()
    for _ in range(20):
        assign = (unit @ centroids.T).argmax(dim=-1)
        for e in range(experts):
            members = unit[assign == e]
            if len(members):
                centroids[e] = F.normalize(members.mean(0), dim=-1)
    logits = x @ centroids.T
    return centroids / logits.std().clamp(min=1e-6)


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """(all parameters, parameters active for one token)."""
    total = sum(p.numel() for p in module.parameters())
    idle = sum(b.idle_parameters() for b in module.modules() if isinstance(b, MoEBlock))
    return total, total - idle


class MoERoutingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MoERouting(ModulePass[MoERoutingOptions]):
    """Swap Hugging Face sparse MoE blocks for the export-safe routing form (same outputs)."""

    name = "moe_routing"

    def __call__(self, module: nn.Module, context: ModulePassContext) -> nn.Module:
        config = getattr(module, "config", None)
        swapped = []
        for path, block in list(module.named_modules()):
            if is_hf_moe_block(block):
                parent_path, _, attr = path.rpartition(".")
                setattr(module.get_submodule(parent_path), attr, from_hf(block, config))
                swapped.append(path)
        if not swapped:
            raise ValueError(
                f"moe_routing: {type(module).__name__} has no Hugging Face sparse MoE block "
                "(a module with a linear `gate` and an `experts` list) to swap"
            )
        context.notes.append(
            f"moe_routing: {len(swapped)} sparse MoE block(s) now route with dense gate masks "
            f"({swapped[0]}, ...)"
        )
        return module


@hookimpl
def compressor_module_passes() -> list[type]:
    return [MoEUpcycle, MoERouting]


@hookimpl
def compressor_validate_models(
    recipe: Recipe, teacher: nn.Module | None, student: nn.Module, data: DataBundle
) -> list[Problem]:
    """Hugging Face sparse MoE blocks left after the module passes route with data-dependent
    shapes (transformers 4's fail capture deep in torch.export: "could not guard on
    data-dependent expression"), and router taps and export read `MoEBlock`s: say so, with
    the fix."""
    problems = []
    for role, model in (("teacher", teacher), ("student", student)):
        blocks = [path for path, m in model.named_modules() if is_hf_moe_block(m)] if model else []
        if blocks:
            kind = type(model.get_submodule(blocks[0])).__name__  # type: ignore[union-attr]
            problems.append(
                Problem(
                    f"the {role} has {len(blocks)} Hugging Face sparse MoE block(s) ({kind} at "
                    f"{blocks[0]}, ...), whose expert loop indexes the tokens each expert was "
                    "given: data-dependent shapes that transformers 4's torch.export capture "
                    "fails on, and that router losses and export here do not read",
                    (role,),
                    "module_passes: [{name: moe_routing, target: both}] swaps them for the "
                    "export-safe block with the same outputs (target: "
                    f"{role} for the {role} alone)",
                )
            )
    return problems
