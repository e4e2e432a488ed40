"""Run one recipe as several arms over several seeds and summarise, in one process.

The examples that compare methods (OFA-KD vs KD vs scratch, DMAE vs fine-tuning alone) use
this: each arm is a list of command-line style overrides, every run gets its own folder, and
the summary is mean and standard deviation of each arm's final eval metrics.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.pipeline import run
from compressor.recipe_file import load_recipe
from compressor.registry import Registry


@dataclass
class ArmResult:
    arm: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    def metric(self, name: str) -> list[float]:
        return [float(r["models"]["student"]["quality"][name]) for r in self.runs]

    def summary(self, name: str = "accuracy") -> dict[str, float]:
        values = self.metric(name)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return {
            "mean": statistics.fmean(values),
            "std": spread,
            "min": min(values),
            "max": max(values),
        }


def run_arms(
    recipe: Path,
    arms: dict[str, list[str]],
    seeds: list[int],
    out_dir: Path,
    registry: Registry | None = None,
    progress: bool = False,
    reuse: bool = False,
) -> dict[str, ArmResult]:
    """Every arm x seed, with `output` and `seed` set per run. Old runs are replaced, or with
    `reuse` kept when finished (their report.json exists): an interrupted sweep resumes."""
    registry = registry or Registry.load()
    results: dict[str, ArmResult] = {}
    for arm, overrides in arms.items():
        results[arm] = ArmResult(arm)
        for seed in seeds:
            folder = out_dir / arm / f"seed{seed}"
            finished = folder / "report.json"
            if reuse and finished.is_file():
                report = json.loads(finished.read_text())
            else:
                report = run_one(recipe, [*overrides, f"seed={seed}"], folder, registry, progress)
            results[arm].runs.append(report)
            accuracy = report["models"]["student"]["quality"]["accuracy"]
            print(f"  {arm:<22} seed {seed}: accuracy {accuracy:.4f}", flush=True)
    return results


def run_one(
    recipe: Path, overrides: list[str], folder: Path, registry: Registry, progress: bool = False
) -> dict[str, Any]:
    """One run of `recipe` into `folder` (replaced if it holds an older run); its report."""
    overrides = [*overrides, f"output={folder}"]
    loaded = load_recipe(recipe, overrides, registry)
    return run(loaded, registry, overwrite=True, progress=progress, overrides=overrides).report


def arm_table(results: dict[str, ArmResult], metric: str = "accuracy") -> list[str]:
    """Markdown rows: arm, mean +- std, min..max, per-seed values."""
    lines = [f"| arm | mean {metric} | std | min | max | per seed |", "|---|---|---|---|---|---|"]
    for arm, result in results.items():
        s = result.summary(metric)
        seeds = ", ".join(f"{v:.4f}" for v in result.metric(metric))
        lines.append(
            f"| {arm} | {s['mean']:.4f} | {s['std']:.4f} | {s['min']:.4f} | {s['max']:.4f} | {seeds} |"
        )
    return lines


def write_summary(path: Path, title: str, sections: list[str], data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".md").write_text(f"# {title}\n\n" + "\n".join(sections) + "\n")
    path.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str) + "\n")
