"""`compress bench RUN_DIR_OR_RECIPE`: latency of teacher and student, of every artifact the
run exported, on every backend available here, side by side. An artifact is loaded by the
exporter that wrote it (`Exporter.runner`, reached through the plan's registry-built
exporters), so the core needs no exporter plugin's internals.

Each candidate (model x artifact x backend) is loaded once (its build time and resident
memory growth recorded), warmed up, then timed in interleaved rounds: round r times every
candidate in turn, so machine noise hits all of them alike. Statistics are over all timed
calls: p50, p90, p99, mean, samples/s. Writes bench.json, bench.md and bench.png into
RUN_DIR/bench/.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model

from compressor.errors import CompressorError
from compressor.export import Exporter
from compressor.loading import Inputs, to_device
from compressor.measure import latency_inputs, torch_runner, warm
from compressor.plan import plan_stages
from compressor.recipe_file import load_recipe
from compressor.registry import Registry
from compressor.run_folder import recorded_overrides
from compressor.step import DistillPlan

BACKENDS = ("pytorch", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt")


@dataclass
class Candidate:
    role: str  # teacher or student
    artifact: str  # "pytorch" (the graph) or the exporter label
    backend: str
    load: Callable[[], Callable[[Inputs], Any]]  # builds the runner
    runner: Callable[[Inputs], Any] | None = None
    build_seconds: float = 0.0
    memory_bytes: int = 0
    times: dict[int, list[float]] = field(default_factory=dict)  # batch -> seconds per call

    @property
    def name(self) -> str:
        return f"{self.role} {self.artifact} [{self.backend}]"


def run_dir_of(target: Path, registry: Registry) -> tuple[Path, Path, list[str]]:
    """(run folder, the recipe it ran, its overrides) from a run folder or a recipe."""
    run_dir = target if target.is_dir() else load_recipe(target, (), registry).run_dir()
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise CompressorError(f"{run_dir} holds no finished run (no report.json)")
    recipe = target if target.is_file() else Path(json.loads(report_path.read_text())["recipe"])
    if not recipe.is_file():
        raise CompressorError(
            f"{run_dir} was run from the recipe {recipe}, which is not found from here: run "
            "compress bench from the folder the run started in, or give the recipe"
        )
    return run_dir, recipe, recorded_overrides(run_dir)


def candidates(plan: DistillPlan, report: dict[str, Any]) -> tuple[list[Candidate], list[str]]:
    """Every (model, artifact, backend) that can run here, and why the others cannot."""
    out: list[Candidate] = []
    skipped: list[str] = []
    graphs = {"teacher": plan.teacher_eval_graph, "student": plan.student_eval_graph}
    device = plan.device
    exporters = {bound.label: bound.exporter for bound in plan.exporters}
    available = _providers()
    for role in ("teacher", "student"):
        graph = graphs[role]
        if graph is None or role not in report["models"]:
            continue
        out.append(
            Candidate(role, "pytorch", f"pytorch-{device.type}", _torch_runner(graph, device))
        )
        for label, entry in report["models"][role]["files"].items():
            path = Path(entry["path"])
            if path.suffix != ".onnx" or not path.is_file():
                continue
            if label not in exporters:
                skipped.append(f"{role} {label}: the recipe has no export entry {label!r} now")
                continue
            for backend, provider in (
                ("onnxruntime-cpu", "CPUExecutionProvider"),
                ("onnxruntime-cuda", "CUDAExecutionProvider"),
            ):
                if provider in available:
                    run = _artifact_runner(exporters[label], path, provider)
                    out.append(Candidate(role, label, backend, run))
                else:
                    skipped.append(
                        f"{role} {label} [{backend}]: onnxruntime has no {provider} here"
                    )
    if not torch.cuda.is_available():
        skipped.append("tensorrt: no CUDA device here")
    return out, skipped


def _providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _torch_runner(
    graph: torch.fx.GraphModule, device: torch.device
) -> Callable[[], Callable[[Inputs], Any]]:
    def load() -> Callable[[Inputs], Any]:
        run = torch_runner(graph, device)
        return lambda x: run((to_device(x, device),))

    return load


def _artifact_runner(
    exporter: Exporter[Any], path: Path, provider: str
) -> Callable[[], Callable[[Inputs], Any]]:
    """The artifact loaded on onnxruntime's `provider` by the exporter that wrote it
    (`Exporter.runner`): a Hugging Face folder with a pruned vocabulary reads the data's
    token ids in its own."""

    def load() -> Callable[[Inputs], Any]:
        run = exporter.runner(path, [provider])
        if run is None:
            raise CompressorError(f"exporter {exporter.name!r} cannot run {path} here")
        return lambda x: run((x,))

    return load


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_all(
    found: list[Candidate],
    batches: dict[int, Inputs],
    rounds: int,
    iterations: int | None,
    duration: float,
) -> None:
    """Load, warm up, then time every candidate in interleaved rounds."""
    for c in found:
        before = _resident_bytes()
        began = time.perf_counter()
        c.runner = c.load()
        for x in batches.values():  # warm-up: first calls allocate and pick kernels
            for _ in range(3):
                c.runner(x)
        c.build_seconds = time.perf_counter() - began
        c.memory_bytes = max(0, _resident_bytes() - before)
    for _ in range(rounds):
        for c in found:
            assert c.runner is not None
            for b, x in batches.items():
                c.times.setdefault(b, []).extend(_time_calls(c.runner, x, iterations, duration))


def _time_calls(
    run: Callable[[Inputs], Any], x: Inputs, iterations: int | None, duration: float
) -> list[float]:
    """Seconds per call: `iterations` calls, or as many as fit in `duration` (at least 3),
    after untimed calls of the same model (`warm`: the one timed before may be another
    runtime whose threads still hold the cores)."""
    warm(functools.partial(run, x))
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < (iterations or 3) or (
        iterations is None and time.perf_counter() - began < duration
    ):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return times


def _percentile_ms(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def summary(found: list[Candidate]) -> list[dict[str, Any]]:
    rows = []
    for c in found:
        for b, times in c.times.items():
            ordered = sorted(times)
            mean = statistics.fmean(times)
            rows.append(
                {
                    "model": c.role,
                    "artifact": c.artifact,
                    "backend": c.backend,
                    "batch": b,
                    "calls": len(times),
                    "p50_ms": statistics.median(times) * 1e3,
                    "p90_ms": _percentile_ms(ordered, 0.90),
                    "p99_ms": _percentile_ms(ordered, 0.99),
                    "mean_ms": mean * 1e3,
                    "samples_per_s": b / mean,
                    "build_s": c.build_seconds,
                    "memory_mib": c.memory_bytes / 2**20,
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]], skipped: list[str], header: str) -> str:
    lines = [f"# Deployment benchmark: {header}", ""]
    lines.append(
        "| model | artifact | backend | batch | p50 ms | p90 ms | p99 ms | mean ms | samples/s "
        "| build s | memory MiB |"
    )
    lines.append("|---" * 11 + "|")
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['artifact']} | {r['backend']} | {r['batch']} | {r['p50_ms']:.3f} "
            f"| {r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['mean_ms']:.3f} | {r['samples_per_s']:.1f} "
            f"| {r['build_s']:.2f} | {r['memory_mib']:.1f} |"
        )
    if skipped:
        lines += ["", "Not measured here:", ""] + [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    names = list(dict.fromkeys(f"{r['model']} {r['artifact']}\n{r['backend']}" for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 0.5 * len(names) + 1.5))
    axes = [axes] if len(batches) == 1 else list(axes)
    for ax, b in zip(axes, batches, strict=True):
        by_name = {
            f"{r['model']} {r['artifact']}\n{r['backend']}": r["p50_ms"]
            for r in rows
            if r["batch"] == b
        }
        ax.barh(names, [by_name.get(n, 0.0) for n in names])
        ax.set_title(f"batch {b}: p50 ms")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bench(
    target: Path,
    registry: Registry,
    batch_sizes: list[int] | None = None,
    tokens: int | None = None,
    backends: list[str] | None = None,
    rounds: int = 5,
    iterations: int | None = None,
    duration: float = 0.5,
) -> tuple[Path, str]:
    """Measure; write RUN_DIR/bench/bench.{json,md,png}; (that folder, the markdown)."""
    run_dir, recipe_path, overrides = run_dir_of(target, registry)
    report = json.loads((run_dir / "report.json").read_text())
    recipe = load_recipe(recipe_path, overrides, registry)
    plan = plan_stages(recipe, registry)[-1][1]
    load_model(plan.student, str(run_dir / "student.safetensors"))
    found, skipped = candidates(plan, report)
    if backends:
        unknown = sorted(set(backends) - {c.backend for c in found} - set(BACKENDS))
        if unknown:
            raise CompressorError(
                f"--backend: unknown {', '.join(unknown)}; known: {', '.join(BACKENDS)}"
            )
        found = [c for c in found if c.backend in backends or c.backend.split("-")[0] in backends]
    sizes = batch_sizes or recipe.report.latency_batches
    shape_tokens = tokens if tokens is not None else recipe.report.latency_tokens
    batches = {b: latency_inputs(plan, b, shape_tokens) for b in sizes}
    measure_all(found, batches, rounds, iterations, duration)
    rows = summary(found)
    out = run_dir / "bench"
    out.mkdir(exist_ok=True)
    header = f"{run_dir} on {report['device']}" + (
        f", {shape_tokens} tokens" if shape_tokens else ""
    )
    text = markdown(rows, skipped, header)
    (out / "bench.md").write_text(text)
    (out / "bench.json").write_text(
        json.dumps(
            {"run": str(run_dir), "rounds": rounds, "rows": rows, "not_measured": skipped}, indent=2
        )
        + "\n"
    )
    plot(rows, out / "bench.png")
    return out, text
