"""Data-parallel runs under torchrun: one process per rank, the same recipe, the same maths.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous; `join` makes the process group
from them (gloo on CPU, NCCL on GPUs). Every rank builds the same plan from the same seed; the
engine gives each rank a contiguous slice of the step's global batch and weights every loss
term by its share of the global units (samples, or scored tokens), so the gradients the ranks
sum are one process's gradients of the whole batch. Only rank 0 writes metrics, the report
and exports.

`Parallel` is how a plan's training step runs across ranks: plainly (one process), under
DistributedDataParallel, or under FSDP2 (`fully_shard`) with the frozen teacher sharded too.
"""

from __future__ import annotations

import contextlib
import datetime
import operator
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from compressor.errors import CompressorError
from compressor.graph_pass import output_node
from compressor.world import SOLO, World, current, launched, use

if TYPE_CHECKING:
    from compressor.recipe import DistributedSpec
    from compressor.step import DistillPlan


def join(device: str, timeout_s: float | None = None) -> World:
    """The process group torchrun described in the environment, made once per process;
    `device` is the recipe's (cpu | cuda | auto) and picks the backend."""
    if not launched():
        return SOLO
    if current().size > 1:
        return current()
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    gpu = device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if gpu else "gloo"
    if gpu:
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
    try:
        dist.init_process_group(backend, timeout=timeout)
    except Exception as exc:
        raise CompressorError(
            f"rank {rank} of {size} could not join the process group ({backend}): {exc}; "
            "check torchrun's --rdzv-endpoint (or MASTER_ADDR/MASTER_PORT) and that every "
            "node can reach it"
        ) from exc
    return use(World(rank, size, local_rank, backend))


def leave() -> None:
    """End this process's part of the run. The ranks leave together: one that tears its
    process group down while another still holds connections to it (rank 0 exporting) can
    abort either, so each waits at a last barrier first."""
    if dist.is_initialized():
        with contextlib.suppress(Exception):  # a peer that already failed: nothing to wait for
            dist.barrier()
        dist.destroy_process_group()
    use(SOLO)


# -- the training step across ranks -------------------------------------------------------------
class TrainStep(nn.Module):
    """The student's training graph and the losses' learned pieces as one module whose forward
    is a whole step's loss terms: what DDP and FSDP wrap, and what names the parameters in
    distributed checkpoints (`student.*`, `losses.*`)."""

    def __init__(self, plan: DistillPlan):
        super().__init__()
        self.student = plan.student_graph
        self.losses = nn.ModuleList([bound.term for bound in plan.losses])
        object.__setattr__(self, "plan", plan)  # not a submodule: the teacher is not trained

    def forward(
        self, x: Any, y: torch.Tensor, cache: Any, indices: list[int]
    ) -> dict[str, torch.Tensor]:
        plan: DistillPlan = self.plan  # type: ignore[assignment]
        return plan.loss_terms(x, y, cache, indices)


def trainable_names(step: nn.Module) -> list[str]:
    """Names of the trained parameters, in the optimizer's order (plan.trainable_parameters)."""
    return [name for name, p in step.named_parameters() if p.requires_grad]


class Parallel:
    """How a plan's step runs on this world: `terms` computes the loss terms (the gradient
    sum over ranks happens in their backward), `full_weights` makes the plain modules (eval
    graph, teacher) hold the current whole weights while evaluating, `close` leaves them
    plain for export. One process: the plan's own step, nothing wrapped."""

    def __init__(self, plan: DistillPlan, world: World, spec: DistributedSpec | None):
        self.plan, self.world = plan, world
        self.strategy = spec.strategy if (spec is not None and world.size > 1) else "none"
        self.module = TrainStep(plan)
        self.step: nn.Module = self.module
        # FSDP: each sharded graph's plain parameters (what the eval graphs and modules hold)
        self._plain: list[tuple[fx.GraphModule, dict[str, nn.Parameter]]] = []
        if self.strategy == "ddp":
            device_ids = [world.local_rank] if plan.device.type == "cuda" else None
            # parameters no loss reaches (a BERT pooler under an embedding loss) need DDP's
            # search for them every step; the rehearsal counted them
            self.step = nn.parallel.DistributedDataParallel(
                self.module, device_ids=device_ids, find_unused_parameters=plan.unreached > 0
            )
        elif self.strategy == "fsdp":
            self._shard(spec)

    def _shard(self, spec: DistributedSpec | None) -> None:
        from torch.distributed.fsdp import fully_shard

        plan = self.plan
        student = plan.student_graph
        teacher = plan.teacher_graph
        if teacher is not None and not any(True for _ in teacher.parameters()):
            teacher = None
        # A graph that returns parameters (the fused head's lm_head weight) hands the loss a
        # view of gathered weights, which resharding after the forward would free: the student
        # keeps its weights gathered until its backward, the teacher keeps those few whole.
        graphs = [gm for gm in (student, teacher) if gm is not None]
        before = [dict(gm.named_parameters()) for gm in graphs]  # what the plain modules hold
        student_returns = bool(_returned_parameters(student))
        fully_shard(student, reshard_after_forward=not student_returns)
        fully_shard(self.module)  # the losses' projections, and the step's root
        kept: set[nn.Parameter] = set()
        if teacher is not None:
            kept = _returned_parameters(teacher)
            # it runs forward only: resharding after it is what keeps 1/N per rank
            reshard = spec.teacher_reshard if spec is not None else True
            fully_shard(teacher, reshard_after_forward=reshard, ignored_params=kept or None)
        for gm, params in zip(graphs, before, strict=True):
            self._plain.append((gm, {n: p for n, p in params.items() if p not in kept}))
        self._release()  # the shards are copies

    def terms(
        self, x: Any, y: torch.Tensor, cache: Any, indices: list[int]
    ) -> dict[str, torch.Tensor]:
        """A step's loss terms, unweighted: through the wrapper when DDP or FSDP sums the
        gradients over the ranks; alone, the plan's own step (a module call would cost
        microseconds a step)."""
        if self.strategy == "none":
            return self.plan.loss_terms(x, y, cache, indices)
        return dict(self.step(x, y, cache, indices))

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Around a micro-batch's backward: gradients are summed over the ranks only on the
        last."""
        if self.strategy == "ddp" and not last:
            assert isinstance(self.step, nn.parallel.DistributedDataParallel)
            return self.step.no_sync()
        if self.strategy == "fsdp":
            self.module.set_requires_gradient_sync(last)  # type: ignore[operator]
        return contextlib.nullcontext()

    def teacher_share(self) -> tuple[int, int] | None:
        """(teacher parameters this rank holds, all of them) under FSDP, else None."""
        if self.strategy != "fsdp" or len(self._plain) < 2:
            return None
        gm, _ = self._plain[1]
        held = sum(_local(p).numel() for p in gm.parameters())
        total = sum(_global_numel(p) for p in gm.parameters())
        return held, total

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[None]:
        """FSDP: the whole current weights in the plain parameters while inside (every rank
        takes part), freed again after."""
        if self.strategy != "fsdp":
            yield
            return
        self._materialize()
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        """Free the whole tensors the plain parameters hold (the shards hold the weights)."""
        for _, plain in self._plain:
            for p in plain.values():
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def close(self) -> None:
        """The plain parameters back in the graphs, holding the trained weights: what exports,
        measurements and later stages use. FSDP's hooks stay on graphs nothing calls again."""
        if isinstance(self.step, nn.parallel.DistributedDataParallel):
            self.step._remove_autograd_hooks()  # a later stage trains these parameters again
        if self.strategy != "fsdp":
            return
        self._materialize()
        for gm, plain in self._plain:
            for name, p in plain.items():
                owner, _, leaf = name.rpartition(".")
                module = gm.get_submodule(owner) if owner else gm
                module._parameters[leaf] = p
        self._plain.clear()

    def _materialize(self) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        for gm, plain in self._plain:
            whole = get_model_state_dict(gm, options=options)
            for name, p in plain.items():
                value = whole[name]
                assert isinstance(value, torch.Tensor)
                p.data = value.to(p.device)


def _returned_parameters(gm: fx.GraphModule) -> set[nn.Parameter]:
    """Parameters the graph returns as they are (taps of get_attr nodes)."""
    found: set[nn.Parameter] = set()
    for node in tree_leaves(output_node(gm).args):
        if isinstance(node, fx.Node) and node.op == "get_attr":
            value = operator.attrgetter(str(node.target))(gm)
            if isinstance(value, nn.Parameter):
                found.add(value)
    return found


def whole(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a value that may be a DTensor (a gradient norm under FSDP)."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if full_tensor is not None else t


def _local(p: torch.Tensor) -> torch.Tensor:
    to_local = getattr(p, "to_local", None)
    return to_local() if to_local is not None else p


def _global_numel(p: torch.Tensor) -> int:
    return int(torch.Size(p.shape).numel())


# -- distributed checkpoints --------------------------------------------------------------------
DCP_METADATA = ".metadata"  # what torch.distributed.checkpoint writes into every checkpoint


def is_distributed_checkpoint(path: Path) -> bool:
    return (path / DCP_METADATA).is_file()


def save_distributed(
    path: Path, module: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]
) -> None:
    """Every rank writes its shards of the step (model, optimizer) into `path`; `extra`
    (schedule, RNG, step: the same on every rank) is written once."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optim": optim_state, **extra}
    dcp.save(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())


def load_distributed(
    path: Path, module: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]
) -> dict[str, Any]:
    """Load a distributed checkpoint at any world size (one process needs no process group);
    `extra` names the other entries with values of their kind, and comes back filled."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optim": optim_state, **extra}
    dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    set_state_dict(
        module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    return {k: state[k] for k in extra}


def load_plain_optimizer(
    step: nn.Module, names: list[str], optimizer: torch.optim.Optimizer, saved: dict[str, Any]
) -> None:
    """A one-process checkpoint's optimizer state (keyed by position) into a wrapped step's
    optimizer: keyed by parameter name, then given to torch as a whole state dict."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    state = {names[i]: value for i, value in saved["state"].items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]
    set_optimizer_state_dict(
        step,
        optimizer,
        {"state": state, "param_groups": groups},
        options=StateDictOptions(full_state_dict=True),
    )
