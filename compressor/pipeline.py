"""`compress recipe.yaml`: plan, train, (baseline), strip, export, verify, report.

The run folder is created only after the whole recipe has been validated and planned, so a
broken recipe writes nothing.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_model

from compressor.checkpoint import latest_checkpoint
from compressor.engine import TrainResult, train
from compressor.errors import CompressorError, ExportError
from compressor.export import Exporter, ExportResult
from compressor.plan import DistillPlan, build_plan
from compressor.recipe import LossSpec, Recipe
from compressor.registry import Registry
from compressor.report import build_report


@dataclass
class RunSummary:
    run_dir: Path
    report: dict[str, Any]
    exports: list[ExportResult]


def run(
    recipe: Recipe,
    registry: Registry,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    overrides: tuple[str, ...] | list[str] = (),
) -> RunSummary:
    plan = build_plan(recipe, registry)
    baseline_plan = (
        build_plan(baseline_recipe(recipe), registry) if recipe.report.baseline else None
    )
    run_dir = recipe.run_dir()
    _claim_run_dir(run_dir, resume, overwrite)
    _write_recipe_copy(recipe, run_dir, overrides)

    result = train(plan, run_dir, resume=resume, progress=progress)
    baseline: TrainResult | None = None
    if baseline_plan is not None:
        base_dir = run_dir / "baseline"
        base_resume = resume and latest_checkpoint(base_dir / "checkpoints") is not None
        baseline = train(baseline_plan, base_dir, resume=base_resume, progress=progress)

    save_model(plan.student, str(run_dir / "student.safetensors"))
    exports = export_student(plan, run_dir / "export")
    report = build_report(plan, result, baseline, exports, run_dir)
    registry.pm.hook.compressor_write_report(report=report, run_dir=run_dir)
    failed = [e for e in exports if not e.ok]
    if failed:
        raise ExportError(
            "; ".join(
                f"{e.exporter} export {e.path} differs from PyTorch by {e.max_abs_diff:.3g} "
                f"(tolerance {e.tolerance:.3g})"
                for e in failed
            )
        )
    return RunSummary(run_dir, report, exports)


def baseline_recipe(recipe: Recipe) -> Recipe:
    """The same student, data and steps with ground-truth cross entropy only: no teacher."""
    ce = next((spec for spec in recipe.losses if spec.name == "ce"), LossSpec(name="ce"))
    return recipe.model_copy(
        update={
            "teacher": None,
            "losses": [ce.model_copy(update={"weight": 1.0})],
            "passes": [p for p in recipe.passes if p.target == "student"],
            "export": [],
        }
    )


def export_student(plan: DistillPlan, out_dir: Path) -> list[ExportResult]:
    results: list[ExportResult] = []
    if not plan.recipe.export:
        return results
    graph = plan.student_eval_graph
    inputs = plan.verify_inputs()
    for i, spec in enumerate(plan.recipe.export):
        exporter: Exporter = plan.registry.create(
            "exporter", spec.name, spec.options, plan.recipe, ("export", i)
        )
        results.append(exporter.export(graph, plan.example_inputs, inputs, out_dir, "student"))
    return results


def _claim_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    has_run = (run_dir / "checkpoints").exists() or (run_dir / "metrics.jsonl").exists()
    if resume:
        if latest_checkpoint(run_dir / "checkpoints") is None:
            raise CompressorError(f"--resume: {run_dir} has no checkpoint to resume from")
        return
    if has_run and not overwrite:
        raise CompressorError(
            f"run folder {run_dir} already holds a run; pass --resume to continue it, "
            "--overwrite to replace it, or output=OTHER_FOLDER"
        )
    if has_run:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def _write_recipe_copy(
    recipe: Recipe, run_dir: Path, overrides: tuple[str, ...] | list[str]
) -> None:
    text = recipe.path.read_text()
    if overrides:
        text += "\n# command-line overrides:\n" + "".join(f"#   {o}\n" for o in overrides)
    (run_dir / "recipe.yaml").write_text(text)
