"""`compress recipe.yaml`: plan, train (and a baseline), export and verify, measure, report.

The run folder is created only after the whole recipe has been validated and planned, so a
broken recipe writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model

from compressor import distributed
from compressor.checkpoint import latest_checkpoint
from compressor.engine import TrainResult, train
from compressor.errors import (
    CompressorError,
    ExportError,
    RecipeError,
    RunFailed,
    failure,
)
from compressor.export import Artifact, ExportResult
from compressor.measure import measure
from compressor.plan import build_plan, plan_stages
from compressor.recipe import LossSpec, Recipe
from compressor.recipe_chain import Chain
from compressor.registry import Registry
from compressor.report import build_report
from compressor.run_folder import check_output, claim, write_recipe_copy
from compressor.step import DistillPlan


def run_chain(chain: Chain, registry: Registry, progress: bool = True) -> None:
    """Run every recipe of the chain whose run has not finished, in order, once the whole
    chain, its top recipe included, is valid: nothing trains for a recipe that would then
    fail. The top recipe is left to run."""
    pending = chain.pending()
    if not pending:
        return
    for link in pending:  # every recipe not yet run, then the top one with them untrained
        plan_stages(link.recipe, registry, chain, untrained_ok=True)
    plan_stages(chain.top, registry, chain, untrained_ok=True)
    for link in pending:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank runs it; one says so
            print(
                f"{link.named_by.locate(link.model_at)}: this model comes from "
                f"{link.recipe.path}; training it first (into {link.recipe.run_dir()})",
                file=sys.stderr,
            )
        run(link.recipe, registry, progress=progress, chain=chain)
        # rank 0 exports and reports after the others have trained: the run is finished for
        # every rank before any plans with it
        distributed.current().barrier()


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
    chain: Chain | None = None,
) -> RunSummary:
    """plan -> train -> export -> measure -> report, each phase using what the one before
    produced. Everything that can be checked is checked by the plan, before the run folder
    exists; a failure after that names its phase and leaves its traceback in error.log.
    `chain`: the recipes models come from, their runs finished (`run_chain`)."""
    check_output(recipe)
    # under torchrun: every rank plans and trains; rank 0 alone claims the folder, writes
    # what is shared and does everything after training
    world = distributed.join(recipe.device, recipe.train.distributed.timeout_s)
    stages = plan_stages(recipe, registry, chain)
    plan = stages[-1][1]
    if recipe.report.baseline and recipe.stages is not None:
        raise RecipeError(
            recipe.locate(("report", "baseline")),
            "report.baseline compares with a single-stage run and is not available with stages",
            "run the stages and a one-stage arm side by side (compressor.sweep.run_arms)",
        )
    baseline_plan = (
        build_plan(baseline_recipe(recipe), registry) if recipe.report.baseline else None
    )
    run_dir = recipe.run_dir()
    with claim(run_dir, resume, overwrite) if world.leader else _Follower() as folder:
        if world.leader:
            write_recipe_copy(recipe, run_dir, overrides)
        world.barrier()  # the folder is ready for every rank's checkpoint shards
        try:
            if recipe.stages is None:
                result = train(plan, run_dir, resume=resume, progress=progress)
                stage_results: list[dict[str, Any]] = []
            else:
                result, stage_results = train_stages(stages, run_dir, resume, progress)
            baseline: TrainResult | None = None
            if baseline_plan is not None:
                base_dir = run_dir / "baseline"
                base_resume = resume and latest_checkpoint(base_dir / "checkpoints") is not None
                baseline = train(baseline_plan, base_dir, resume=base_resume, progress=progress)
            if not world.leader:  # this rank's part is done
                return RunSummary(run_dir, {}, [])
            with failure("saving the student"):
                save_model(plan.student, str(run_dir / "student.safetensors"))
            exports = export_artifacts(plan, run_dir / "export")
            folder.record()
            measured = measure(plan, exports)
            report = build_report(plan, result, baseline, exports, measured, stage_results)
            with failure("writing the report"):
                registry.pm.hook.compressor_write_report(report=report, run_dir=run_dir)
        except RunFailed as exc:
            if not world.leader:  # rank 0 alone writes error.log
                trace = "".join(traceback.format_exception(exc.cause))
                raise CompressorError(f"{exc}\n{trace}") from exc
            raise CompressorError(f"{exc}\n  {_log_failure(run_dir, exc.cause)}") from exc
    student_exports = [e for e in exports if e.role == "student"]
    failed = [e.result for e in student_exports if not e.result.ok]
    if failed:
        raise ExportError("; ".join(e.failure() for e in failed))
    return RunSummary(run_dir, report, [e.result for e in student_exports])


class _Follower(contextlib.AbstractContextManager["_Follower"]):
    """What a rank other than 0 holds in place of the claimed run folder."""

    def __exit__(self, *exc: object) -> None:
        return None

    def record(self) -> None:
        pass


def train_stages(
    stages: list[tuple[str, DistillPlan]], run_dir: Path, resume: bool, progress: bool
) -> tuple[TrainResult, list[dict[str, Any]]]:
    """Train stage after stage, each in its own folder (stages/1-general, ...). A finished
    stage leaves `done.json` and the student's weights; resuming skips finished stages,
    restores the student they produced and resumes the stage in progress at its checkpoint.
    Returns one result over all steps (histories on a global step axis) and per-stage results."""
    history: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    offset, seconds = 0, 0.0
    initial: dict[str, float] = {}
    final: dict[str, float] = {}
    world = distributed.current()
    for i, (name, plan) in enumerate(stages):
        stage_dir = run_dir / "stages" / f"{i + 1}-{name}"
        done = stage_dir / "done.json"
        if resume and done.is_file():
            summary = json.loads(done.read_text())
            load_model(plan.student, str(stage_dir / "student.safetensors"))
        else:
            if progress and world.leader:
                print(f"stage {i + 1}/{len(stages)}: {name}", file=sys.stderr, flush=True)
            has_checkpoint = latest_checkpoint(stage_dir / "checkpoints") is not None
            result = train(plan, stage_dir, resume=resume and has_checkpoint, progress=progress)
            if world.leader:
                save_model(plan.student, str(stage_dir / "student.safetensors"))
            summary = {
                "name": name,
                "steps": result.steps,
                "teacher": plan.recipe.teacher.model_dump() if plan.recipe.teacher else None,
                "data": plan.recipe.data.model_dump(),
                "data_sizes": plan.data.sizes(),
                "losses": [{"name": b.label, "weight": b.weight} for b in plan.losses],
                "initial_eval": result.initial_eval,
                "final_eval": result.final_eval,
                "seconds": round(result.seconds, 2),
                "history": result.history,
            }
            if world.leader:
                done.write_text(json.dumps(summary, indent=2, default=str) + "\n")
            world.barrier()  # a stage is done for every rank before any resumes past it
        for record in summary["history"]:
            history.append({**record, "step": record["step"] + offset, "stage": name})
        # the final task's metric after every stage: what each stage contributed
        last = stages[-1][1]
        with failure(f"evaluation after stage {name!r}"):
            summary["task_eval"] = last.evaluator(last.student_eval_graph, shard=world)
        initial = initial or summary["initial_eval"]
        final = summary["final_eval"]
        offset += summary["steps"]
        seconds += summary["seconds"]
        summaries.append(summary)
    return TrainResult(run_dir, offset, final, initial, history, seconds), summaries


def baseline_recipe(recipe: Recipe) -> Recipe:
    """The same student, data and steps with ground-truth cross entropy only: no teacher."""
    ce = next((spec for spec in recipe.losses if spec.name == "ce"), LossSpec(name="ce"))
    return recipe.model_copy(
        update={
            "teacher": None,
            "teacher_cache": None,
            "losses": [ce.model_copy(update={"weight": 1.0})],
            "passes": [p for p in recipe.passes if p.target == "student"],
            "export": [],
        }
    )


def export_artifacts(plan: DistillPlan, out_dir: Path) -> list[Artifact]:
    """Every exporter of the plan on the student (what is shipped) and, unless the recipe
    says not to, on the whole teacher (to measure what the student saves); each artifact
    verified against PyTorch."""
    artifacts: list[Artifact] = []
    inputs = plan.verify_inputs()
    roles = [("student", plan.student_eval_graph, plan.student)]
    whole, teacher = plan.teacher_eval_graph, plan.teacher
    if whole is not None and teacher is not None and plan.recipe.report.export_teacher:
        roles.append(("teacher", whole, teacher))
    for bound in plan.exporters:
        # two entries of one exporter write to folders of their own
        folder = out_dir if bound.label == bound.exporter.name else out_dir / bound.label
        for role, graph, module in roles:
            with failure(f"export {bound.label!r} of the {role}"):
                result = bound.exporter.export(
                    graph, plan.example_inputs, inputs, folder, role, module
                )
            result.label = bound.label
            artifacts.append(Artifact(role, bound.label, bound.exporter, result))
    return artifacts


def _log_failure(run_dir: Path, cause: BaseException) -> str:
    """The traceback goes to error.log; where that cannot be written, it is shown."""
    text = "".join(traceback.format_exception(cause))
    log = run_dir / "error.log"
    try:
        log.write_text(text)
    except OSError as exc:
        return f"error.log could not be written ({exc.strerror}); the traceback:\n{text}"
    return f"full traceback: {log}"
