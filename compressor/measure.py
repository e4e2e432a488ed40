"""Measure teacher and student side by side: quality on the eval set, size, and latency of
the PyTorch graph and of every exported artifact. What the report shows, measured once.

PyTorch runs on the plan's device (where the models already are: nothing is moved);
exported artifacts run where their exporter runs them (onnxruntime on the CPU here).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from compressor.errors import failure
from compressor.export import Artifact, Runner
from compressor.loading import Inputs, call_model, to_device
from compressor.step import DistillPlan


def measure(plan: DistillPlan, artifacts: list[Artifact]) -> dict[str, dict[str, Any]]:
    """role -> parameters, state bytes, quality, latency (ms per runtime and batch), files."""
    report = plan.recipe.report
    batches = {b: latency_inputs(plan, b, report.latency_tokens) for b in report.latency_batches}
    prompt = _prompt(plan)  # for artifacts that generate
    graphs: list[tuple[str, fx.GraphModule]] = [("student", plan.student_eval_graph)]
    if plan.teacher_eval_graph is not None:
        graphs.insert(0, ("teacher", plan.teacher_eval_graph))
    out: dict[str, dict[str, Any]] = {}
    timed: list[Timed] = []
    for role, graph in graphs:
        with failure(f"measuring the {role}"):
            out[role] = {
                **_used_state(graph),
                "quality": plan.evaluator(graph),
                **_active_parameters(plan.student if role == "student" else plan.teacher),
                "latency_ms": {},  # "pytorch": on report["device"]
                "files": {},
            }
        on_device = {b: to_device(x, plan.device) for b, x in batches.items()}
        timed.append(Timed(role, "pytorch", torch_runner(graph, plan.device), on_device))
        for artifact in (a for a in artifacts if a.role == role):
            path, label = artifact.result.path, artifact.label
            out[role]["files"][label] = {"path": str(path), "bytes": path.stat().st_size}
            if artifact.result.drop is not None:  # lossy: its own scores, not PyTorch's
                out[role]["files"][label]["quality"] = artifact.result.details.get("int8", {})
            with failure(f"measuring the {role}'s {label} artifact"):
                run = artifact.exporter.runner(path)
                rate = artifact.exporter.generation_rate(path, prompt, GENERATED_TOKENS)
            if run is None:  # cannot run here
                out[role]["latency_ms"][label] = {str(b): None for b in batches}
            else:
                timed.append(Timed(role, label, run, batches))
            if rate is not None:
                out[role].setdefault("generation_tokens_per_s", {})[label] = rate
    for t, seconds in zip(timed, interleaved_medians(timed, report.latency_repeats), strict=True):
        out[t.role]["latency_ms"][t.label] = {str(b): s * 1e3 for b, s in seconds.items()}
    return out


@dataclass
class Timed:
    """One model or artifact to time: whose, which, how it runs, on what (batch -> inputs)."""

    role: str
    label: str
    run: Runner
    inputs: dict[int, Inputs]

    @property
    def name(self) -> str:
        return f"the {self.role}'s {self.label}" + ("" if self.label == "pytorch" else " artifact")


# Untimed calls of the model about to be timed, right after another runtime's: that one's
# threads still spin on the cores and this one's pool is asleep (on 2 cores an onnxruntime
# call after PyTorch's took 2x its steady time, PyTorch's after onnxruntime's 3x, for about
# 10 calls of a small model), while a served model runs warm.
WARM_SECONDS = 0.025


def warm(call: Callable[[], Any], seconds: float = WARM_SECONDS) -> None:
    """Call `call` for `seconds`, at least once."""
    began = time.perf_counter()
    call()
    while time.perf_counter() - began < seconds:
        call()


def interleaved_medians(
    timed: list[Timed], rounds: int, warm_seconds: float = WARM_SECONDS
) -> list[dict[int, float]]:
    """Median seconds per call of each entry and batch. Each is warmed up (3 calls a batch),
    then timed over `rounds` rounds, the entries in turn (starting one later every round):
    machine noise falls on all of them alike, so the ratios between them hold even when the
    machine is busy. In a round each entry runs each batch for `warm_seconds` (`warm`)
    before the call that is timed."""
    for t in timed:
        with failure(f"measuring {t.name}"):
            for x in t.inputs.values():
                for _ in range(3):
                    t.run((x,))
    times: list[dict[int, list[float]]] = [{b: [] for b in t.inputs} for t in timed]
    for round_ in range(rounds):
        first = round_ % len(timed)
        for i in [*range(first, len(timed)), *range(first)]:
            for b, x in timed[i].inputs.items():
                warm(functools.partial(timed[i].run, (x,)), warm_seconds)
                began = time.perf_counter()
                timed[i].run((x,))
                times[i][b].append(time.perf_counter() - began)
    return [{b: statistics.median(calls) for b, calls in each.items()} for each in times]


def torch_runner(graph: fx.GraphModule, device: torch.device) -> Runner:
    """The graph run without gradients on inputs already on `device`; returns when the
    device has finished."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(inputs: tuple[Inputs, ...]) -> object:
        with torch.no_grad():
            out = call_model(graph, inputs[0])
        sync()
        return out

    return run


# generation is timed as GENERATED_TOKENS greedy tokens after a PROMPT_TOKENS-token prompt
GENERATED_TOKENS, PROMPT_TOKENS = 32, 32


def _prompt(plan: DistillPlan) -> Inputs:
    """The first eval sample's first PROMPT_TOKENS real tokens, on the CPU."""
    x, _ = plan.data.batch("eval", [0], torch.device("cpu"))
    if not isinstance(x, dict):
        return x
    length = min(PROMPT_TOKENS, int(x["attention_mask"][0].sum()))
    return {k: v[:, :length] for k, v in x.items()}


def latency_inputs(plan: DistillPlan, batch: int, tokens: int | None) -> Inputs:
    """`batch` eval samples on the CPU; texts cut or repeated to exactly `tokens` real tokens
    each when asked (deployment latency is quoted at a fixed shape, e.g. 32 x 128)."""
    indices = [i % len(plan.data.eval) for i in range(batch)]
    x, _ = plan.data.batch("eval", indices, torch.device("cpu"))
    if tokens is None or not isinstance(x, dict):
        return x
    ids = x["input_ids"]
    repeats = -(-tokens // ids.shape[1])
    ids = ids.repeat(1, repeats)[:, :tokens]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _used_state(graph: fx.GraphModule) -> dict[str, int]:
    """Parameters and state bytes of what the graph's output depends on: the teacher's graph
    is kept whole for export, so parts no output reads (a BERT pooler under mean-pooled
    embeddings) would otherwise count for it and not for the stripped student."""
    live: set[fx.Node] = set()
    stack = [n for n in graph.graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    read = {str(n.target) for n in live if n.op in ("call_module", "get_attr")}
    state = {  # by identity: a tied weight counts once
        id(t): t
        for name, t in graph.state_dict(keep_vars=True).items()
        if any(name == r or name.startswith(r + ".") for r in read)
    }
    parameters = {id(p) for p in graph.parameters()}
    return {
        "parameters": sum(t.numel() for t in state.values() if id(t) in parameters),
        "state_bytes": sum(t.numel() * t.element_size() for t in state.values()),
    }


def _active_parameters(module: nn.Module | None) -> dict[str, int]:
    """{"active_parameters": n} for a model some of whose parameters each token skips: the
    modules that route tokens say how many of theirs idle per token (`idle_parameters()`,
    as a mixture of experts does); {} for a model that uses all of them."""
    if module is None:
        return {}
    idle = sum(
        int(m.idle_parameters())  # type: ignore[operator, misc]
        for m in module.modules()
        if callable(getattr(m, "idle_parameters", None))
    )
    total = sum(p.numel() for p in module.parameters())
    return {"active_parameters": total - idle} if idle else {}
