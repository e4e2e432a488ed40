"""Measure teacher and student side by side for report.json (plugins write the files)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from compressor.engine import TrainResult
from compressor.evaluate import evaluate
from compressor.export import Exporter, ExportResult
from compressor.loading import Inputs, call_model, collate
from compressor.plan import DistillPlan


def build_report(
    plan: DistillPlan,
    result: TrainResult,
    baseline: TrainResult | None,
    exports: list[ExportResult],
    run_dir: Path,
) -> dict[str, Any]:
    recipe = plan.recipe
    cpu = torch.device("cpu")
    batches = {
        b: _latency_inputs(plan, b, recipe.report.latency_tokens)
        for b in recipe.report.latency_batches
    }
    reference = plan.reference_embeddings()
    models: dict[str, Any] = {}
    artifacts = {e.exporter: e.path for e in exports}
    roles: list[tuple[str, nn.Module]] = [("student", plan.student_eval_graph)]
    if plan.teacher is not None:
        roles.insert(0, ("teacher", plan.teacher))
        artifacts_teacher = _export_teacher(plan, run_dir / "export")
    for role, module in roles:
        module.to(cpu)  # reports measure deployment on the CPU
        if not isinstance(module, fx.GraphModule):  # graphs have their eval form baked in
            module.eval()
        entry: dict[str, Any] = {
            "parameters": sum(p.numel() for p in module.parameters()),
            "state_bytes": sum(t.numel() * t.element_size() for t in module.state_dict().values()),
            "quality": evaluate(module, plan.data, recipe.data.eval_batch_size, cpu, reference),
            "latency_ms": {
                "pytorch": {
                    str(b): _torch_latency(module, x, recipe.report.latency_repeats)
                    for b, x in batches.items()
                }
            },
            "files": {},
        }
        paths = artifacts if role == "student" else artifacts_teacher
        for exporter_name, path in paths.items():
            exporter: Exporter = plan.registry.create(
                "exporter", exporter_name, _options(plan, exporter_name)
            )
            entry["files"][exporter_name] = {"path": str(path), "bytes": path.stat().st_size}
            timings = {
                str(b): exporter.latency(path, (x,), recipe.report.latency_repeats)
                for b, x in batches.items()
            }
            entry["latency_ms"][exporter_name] = {
                b: None if t is None else t * 1e3 for b, t in timings.items()
            }
        models[role] = entry
    models["student"]["initial_quality"] = result.initial_eval
    if baseline is not None:
        models["baseline"] = {"quality": baseline.final_eval, "history": baseline.history}
    report: dict[str, Any] = {
        "name": recipe.name,
        "recipe": str(recipe.path),
        "task": plan.data.task,
        "device": str(plan.device),
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        "losses": [{"name": b.label, "weight": b.weight} for b in plan.losses],
        "models": models,
        "history": result.history,
        "exports": [
            {
                "exporter": e.exporter,
                "path": str(e.path),
                "max_abs_diff": e.max_abs_diff,
                "tolerance": e.tolerance,
                "ok": e.ok,
                **e.details,
            }
            for e in exports
        ],
    }
    if "teacher" in models:
        t, s = models["teacher"], models["student"]
        report["compression"] = {"parameter_ratio": t["parameters"] / max(1, s["parameters"])}
    if baseline is not None:
        report["distillation_gain"] = {
            k: v - baseline.final_eval[k]
            for k, v in models["student"]["quality"].items()
            if k in baseline.final_eval
        }
    return report


def _options(plan: DistillPlan, exporter_name: str) -> dict[str, Any]:
    return next(spec.options for spec in plan.recipe.export if spec.name == exporter_name)


def _export_teacher(plan: DistillPlan, out_dir: Path) -> dict[str, Path]:
    """The teacher exported the same way, only to measure its deployed latency and size."""
    assert plan.teacher is not None
    graph = plan.capture(plan.teacher, "teacher")  # plain: the teacher as users deploy it
    out = {}
    for i, spec in enumerate(plan.recipe.export):
        exporter: Exporter = plan.registry.create(
            "exporter", spec.name, spec.options, plan.recipe, ("export", i)
        )
        out[spec.name] = exporter.export(
            graph, plan.example_inputs, plan.verify_inputs(), out_dir, "teacher", plan.teacher
        ).path
    return out


def _latency_inputs(plan: DistillPlan, batch: int, tokens: int | None) -> Inputs:
    """`batch` eval samples; texts cut or repeated to exactly `tokens` real tokens each when
    asked (deployment latency is quoted at a fixed shape, e.g. 32 x 128)."""
    x = collate(
        plan.data.eval, [i % len(plan.data.eval) for i in range(batch)], torch.device("cpu")
    )[0]
    if tokens is None or not isinstance(x, dict):
        return x
    ids = x["input_ids"]
    repeats = -(-tokens // ids.shape[1])
    ids = ids.repeat(1, repeats)[:, :tokens]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _torch_latency(module: nn.Module, x: Inputs, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            call_model(module, x)
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            call_model(module, x)
            times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3
