"""Measure teacher and student side by side: quality on the eval set, size, and latency of
the PyTorch graph and of every exported artifact. What the report shows, measured once.

PyTorch runs on the plan's device (where the models already are: nothing is moved);
exported artifacts run where their exporter runs them (onnxruntime on the CPU here).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import fx, nn

from compressor.errors import failure
from compressor.export import Artifact
from compressor.loading import Inputs, call_model, to_device
from compressor.plan import DistillPlan


def measure(plan: DistillPlan, artifacts: list[Artifact]) -> dict[str, dict[str, Any]]:
    """role -> parameters, state bytes, quality, latency (ms per runtime and batch), files."""
    report = plan.recipe.report
    batches = {b: latency_inputs(plan, b, report.latency_tokens) for b in report.latency_batches}
    prompt = _prompt(plan)  # for artifacts that generate
    graphs: list[tuple[str, fx.GraphModule]] = [("student", plan.student_eval_graph)]
    if plan.teacher_eval_graph is not None:
        graphs.insert(0, ("teacher", plan.teacher_eval_graph))
    out: dict[str, dict[str, Any]] = {}
    for role, graph in graphs:
        with failure(f"measuring the {role}"):
            pytorch = {
                str(b): _latency(graph, to_device(x, plan.device), report.latency_repeats, plan)
                for b, x in batches.items()
            }
            entry: dict[str, Any] = {
                "parameters": sum(p.numel() for p in graph.parameters()),
                "state_bytes": sum(
                    t.numel() * t.element_size() for t in graph.state_dict().values()
                ),
                "quality": plan.evaluator(graph),
                **_active_parameters(plan.student if role == "student" else plan.teacher),
                "latency_ms": {"pytorch": pytorch},  # on report["device"]
                "files": {},
            }
        for artifact in (a for a in artifacts if a.role == role):
            path, label = artifact.result.path, artifact.label
            entry["files"][label] = {"path": str(path), "bytes": path.stat().st_size}
            with failure(f"measuring the {role}'s {label} artifact"):
                timings = {
                    str(b): artifact.exporter.latency(path, (x,), report.latency_repeats)
                    for b, x in batches.items()
                }
                rate = artifact.exporter.generation_rate(path, prompt, GENERATED_TOKENS)
            entry["latency_ms"][label] = {
                b: None if t is None else t * 1e3 for b, t in timings.items()
            }
            if rate is not None:
                entry.setdefault("generation_tokens_per_s", {})[label] = rate
        out[role] = entry
    return out


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


def _latency(graph: fx.GraphModule, x: Inputs, repeats: int, plan: DistillPlan) -> float:
    """Median milliseconds per call after 3 warm-up calls."""
    sync = torch.cuda.synchronize if plan.device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(3):
            call_model(graph, x)
        times = []
        for _ in range(repeats):
            sync()
            began = time.perf_counter()
            call_model(graph, x)
            sync()
            times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


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
