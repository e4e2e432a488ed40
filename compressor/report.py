"""report.json's content: a pure function of the plan's facts and the run's results (training,
baseline, exports, measurements). Plugins write the files (`compressor_write_report`)."""

from __future__ import annotations

from typing import Any

from compressor.engine import TrainResult
from compressor.export import Artifact
from compressor.plan import DistillPlan


def build_report(
    plan: DistillPlan,
    result: TrainResult,
    baseline: TrainResult | None,
    artifacts: list[Artifact],
    measured: dict[str, dict[str, Any]],
    stages: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    recipe = plan.recipe
    models = {role: dict(entry) for role, entry in measured.items()}
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
                "exporter": a.result.exporter,
                "label": a.label,
                "path": str(a.result.path),
                "max_abs_diff": a.result.max_abs_diff,
                "tolerance": a.result.tolerance,
                "ok": a.result.ok,
                **a.result.details,
            }
            for a in artifacts
            if a.role == "student"
        ],
    }
    warnings = plan.evaluator.warnings(result.initial_eval, result.final_eval)
    if warnings:
        report["warnings"] = warnings
    if plan.notes:
        report["pass_notes"] = plan.notes
    if "teacher" in models:
        t, s = models["teacher"], models["student"]
        report["compression"] = {"parameter_ratio": t["parameters"] / max(1, s["parameters"])}
    if baseline is not None:
        report["distillation_gain"] = {
            k: v - baseline.final_eval[k]
            for k, v in models["student"]["quality"].items()
            if k in baseline.final_eval
        }
    if stages:
        report["stages"] = stages
    return report
