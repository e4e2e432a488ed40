"""ERNIE-Tiny's four stages against the task-specific stage alone, as the paper compares them.

    python examples/ernie-tiny/run.py [--seeds 0 1 2] [--students layers] [--out runs/ernie-tiny]
    (62 minutes on 2 cores for one student and three seeds, the task teacher included)

The recipe's task teacher is finetune.yaml's student (all-MiniLM-L6-v2 fine-tuned on the
docstring-family task), trained first when its run is missing and reused after. Then, per
seed, three arms of recipe.yaml:
  (a) the four stages: general, general-enhanced, task-adaptive, task-specific;
  (b) the task-specific stage alone, with the steps it has in (a);
  (c) the task-specific stage alone, with (a)'s total steps.
(a) against (b) asks whether the label-free stages add anything; (a) against (c) whether they
are worth their steps. The general corpus is the standard library's prose less the task's
docstrings; the report gives its size against the task data. The classifier head is trained
in every stage that uses labels (task-specific). Writes <out>/report.md and report.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from compressor.pipeline import run_chain
from compressor.recipe_chain import Chain
from compressor.recipe_file import load_recipe
from compressor.registry import Registry
from compressor.sweep import ArmResult, arm_table, run_one, write_summary

HERE = Path(__file__).resolve().parent
STAGES = ["general", "general-enhanced", "task-adaptive", "task-specific"]
STUDENTS = {
    "layers": ("teacher blocks 0 and 5", []),
    # fresh weights, where general distillation has the most to teach
    "narrow": (
        "hidden 192, 12 heads, fresh weights",
        [
            "module_passes.0.hidden_size=192",
            "module_passes.0.num_attention_heads=12",
            "train.optimizer.lr=3.0e-4",
        ],
    ),
}


def _arms(steps: list[int]) -> dict[str, list[str]]:
    alone = "stages.only=[task-specific]"
    return {
        "a: 4 stages": [f"stages.steps={steps}"],
        f"b: task-specific alone, {steps[3]} steps": [f"stages.steps=[1, 1, 1, {steps[3]}]", alone],
        f"c: task-specific alone, {sum(steps)} steps": [
            f"stages.steps=[1, 1, 1, {sum(steps)}]",
            alone,
        ],
    }


def _claim(staged: ArmResult, other: ArmResult) -> tuple[float, str]:
    """The staged arm's mean gain over `other` in accuracy points, and whether it holds:
    a gain counts when it is larger than the seeds' spread (the larger standard deviation)."""
    a, b = staged.metric("accuracy"), other.metric("accuracy")
    gain = (statistics.fmean(a) - statistics.fmean(b)) * 100
    spread = max(statistics.stdev(a), statistics.stdev(b)) * 100 if len(a) > 1 else 0.0
    if gain > spread:
        return gain, f"holds ({gain:+.2f} points, spread {spread:.2f})"
    if gain < -spread:
        return gain, f"is reversed ({gain:+.2f} points, spread {spread:.2f})"
    return gain, f"is not shown ({gain:+.2f} points, within the spread of {spread:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--students", nargs="+", choices=list(STUDENTS), default=["layers"])
    parser.add_argument("--out", type=Path, default=Path("runs/ernie-tiny"))
    args = parser.parse_args()
    registry = Registry.load()

    # the recipe's task teacher is finetune.yaml's student: trained once, reused by every arm
    recipe = load_recipe(HERE / "recipe.yaml", registry=registry)
    run_chain(Chain(recipe, registry), registry)
    teacher_run = load_recipe(HERE / "finetune.yaml").run_dir()
    teacher = json.loads((teacher_run / "report.json").read_text())
    teacher_accuracy = teacher["models"]["student"]["quality"]["accuracy"]
    print(f"task teacher (fine-tuned MiniLM-L6): accuracy {teacher_accuracy:.4f}", flush=True)

    steps = [int(stage.steps or recipe.train.steps) for stage in recipe.stages or []]
    arms = _arms(steps)
    data: dict[str, Any] = {"teacher_accuracy": teacher_accuracy, "steps": steps}
    sections: list[str] = []
    for key in args.students:
        student, student_overrides = STUDENTS[key]
        results = {arm: ArmResult(arm) for arm in arms}
        per_stage: list[list[float]] = []
        for seed in args.seeds:
            for arm, overrides in arms.items():
                folder = args.out / key / arm.split(":")[0] / f"seed{seed}"
                finished = folder / "report.json"
                report = (
                    json.loads(finished.read_text())
                    if finished.is_file()
                    else run_one(
                        HERE / "recipe.yaml",
                        [*overrides, *student_overrides, f"seed={seed}"],
                        folder,
                        registry,
                        progress=True,
                    )
                )
                results[arm].runs.append(report)
                if arm.startswith("a"):
                    per_stage.append([s["task_eval"]["accuracy"] for s in report["stages"]])
                    sizes = [s["data_sizes"] for s in report["stages"]]
                accuracy = report["models"]["student"]["quality"]["accuracy"]
                print(f"  {key} / {arm}, seed {seed}: accuracy {accuracy:.4f}", flush=True)
        staged, alone_same, alone_total = results.values()
        gain_b, over_b = _claim(staged, alone_same)
        gain_c, over_c = _claim(staged, alone_total)
        sections += [
            f"## Student: {student}",
            "",
            *arm_table(results),
            "",
            f"- (a) over (b), the label-free stages add to the task-specific stage: {over_b}.",
            f"- (a) over (c), the stages are worth their steps: {over_c}.",
            "",
            "Task accuracy of the staged student after each stage:",
            "",
            "| seed | " + " | ".join(STAGES) + " |",
            "|---" * (len(STAGES) + 1) + "|",
            *(
                f"| {seed} | " + " | ".join(f"{a:.4f}" for a in accs) + " |"
                for seed, accs in zip(args.seeds, per_stage, strict=True)
            ),
            "",
        ]
        data[key] = {
            arm: r.summary() | {"per_seed": r.metric("accuracy")} for arm, r in results.items()
        } | {"per_stage": per_stage, "a_minus_b": gain_b, "a_minus_c": gain_c}
    general, task = sizes[0], sizes[3]
    ratio = general["train_tokens"] / task["train_tokens"]
    data |= {"general_data": general, "task_data": task, "general_to_task_tokens": ratio}
    intro = _intro(general, task, ratio, teacher_accuracy, steps, args.seeds)
    write_summary(
        args.out / "report", "ERNIE-Tiny stages on docstring families", intro + sections, data
    )
    print((args.out / "report.md").read_text())


def _intro(
    general: dict[str, Any],
    task: dict[str, Any],
    ratio: float,
    teacher_accuracy: float,
    steps: list[int],
    seeds: list[int],
) -> list[str]:
    """The report's opening: the task, the teacher, the general corpus, the arms."""
    return [
        "Task: which standard-library family a docstring comes from (6 classes, "
        f"{task['train_samples']} docstrings to train on, {task['eval_samples']} held out). "
        f"Task teacher: all-MiniLM-L6-v2 fine-tuned on the same {task['train_samples']}, "
        f"accuracy {teacher_accuracy:.4f}.",
        f"General corpus: {general['train_samples']:,} paragraphs of the standard library's "
        f"prose without the task's docstrings, {general['train_tokens']:,} tokens against the "
        f"task's {task['train_tokens']:,} ({ratio:.1f}x).",
        f"Steps per stage in (a): {', '.join(f'{n} {s}' for n, s in zip(steps, STAGES, strict=True))}; "
        f"seeds {', '.join(map(str, seeds))}. Accuracy on the held-out docstrings.",
        "",
    ]


if __name__ == "__main__":
    main()
