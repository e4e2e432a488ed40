"""report.json's content: a pure function of the plan's facts and the run's results (training,
baseline, exports, measurements). Plugins write the files (`compressor_write_report`)."""

from __future__ import annotations

from typing import Any

from compressor.engine import TrainResult
from compressor.export import Artifact
from compressor.step import DistillPlan


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
        "metric": plan.evaluator.primary,  # the one that says better or worse
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
                **(
                    {"drop": a.result.drop, "max_drop": a.result.max_drop}
                    if a.result.drop is not None
                    else {}
                ),
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
    observed = _last_observed(result.history, [b.label for b in plan.losses])
    if observed:
        report["observed"] = observed
    if result.teacher_cache is not None:
        report["teacher_cache"] = result.teacher_cache
    return report


def _last_observed(history: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """What the loss terms observed (`LossTerm.observed`) at the last evaluation that has it."""
    prefixes = tuple(f"{label}/" for label in labels)
    for record in reversed(history):
        seen = {k: v for k, v in record.items() if k.startswith(prefixes)}
        if seen:
            return {"step": record["step"], **seen}
    return {}
