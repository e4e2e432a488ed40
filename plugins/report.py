"""Built-in report: report.json, report.md and curves.png in the run folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compressor.api import GENERATED_TOKENS, PROMPT_TOKENS, export_check, hookimpl


@hookimpl
def compressor_write_report(report: dict[str, Any], run_dir: Path) -> list[Path]:
    json_path = run_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path = run_dir / "report.md"
    md_path.write_text(render_markdown(report))
    paths = [json_path, md_path]
    png = _plot_curves(report, run_dir / "curves.png")
    if png is not None:
        paths.append(png)
    return paths


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _cache_line(cache: dict[str, Any]) -> str:
    def rate(value: float | None) -> str:
        return f"{value:.3g} steps/s" if value else "not measured"

    speedup = f" ({cache['speedup']:.2f}x)" if cache.get("speedup") else ""
    full = "; its memory budget was reached" if cache["budget_reached"] else ""
    return (
        f"Teacher cache: {cache['cached_samples']} samples, {cache['cached_mb']:.1f} MB{full}. "
        f"{cache['steps_with_teacher']} steps ran the teacher at "
        f"{rate(cache['steps_per_s_with_teacher'])}, {cache['steps_from_cache']} read the cache "
        f"at {rate(cache['steps_per_s_from_cache'])}{speedup}."
    )


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# {report['name']}: distillation report", ""]
    lines += [f"> **Warning:** {text}." for text in report.get("warnings", [])]
    if report.get("warnings"):
        lines.append("")
    lines.append(
        f"Recipe `{report['recipe']}`, {report['steps']} steps on {report['device']} "
        f"in {report['train_seconds']} s. Losses: "
        + ", ".join(f"{loss['name']} x{loss['weight']}" for loss in report["losses"])
        + "."
    )
    cache = report.get("teacher_cache")
    if cache:
        lines += ["", _cache_line(cache)]
    lines += _quality_lines(report)
    if report.get("stages"):
        lines += _stage_lines(report["stages"])
    observed = report.get("observed")
    if observed:
        lines += [
            "",
            f"Observed by the loss terms on the training batch of step {observed['step']}: ",
        ]
        lines += [f"- {k}: {_fmt(v)}" for k, v in observed.items() if k != "step"]
    notes = report.get("pass_notes")
    if notes:
        lines += ["", "## What the passes did", ""] + [f"- {note}" for note in notes]
    lines += _size_lines(report)
    lines += _deployment_lines(report)
    lines += ["", "## Exports", ""]
    for e in report["exports"]:
        verdict = "verified" if e["ok"] else "FAILED"
        lines.append(
            f"- {e.get('label', e['exporter'])}: `{e['path']}`: {export_check(e)} {verdict}"
        )
    lines += ["", "![training curves](curves.png)", ""]
    return "\n".join(lines)


def _quality_lines(report: dict[str, Any]) -> list[str]:
    """Each model's metrics on the eval set (the student before training too), and the gain."""
    models = report["models"]
    roles = [r for r in ("teacher", "student", "baseline") if r in models]
    keys = list(models["student"]["quality"])
    lines = [
        "",
        "## Quality (eval set)",
        "",
        "| model | " + " | ".join(keys) + " |",
        "|---" * (1 + len(keys)) + "|",
    ]
    rows = [(role, models[role]["quality"]) for role in roles]
    before = models["student"].get("initial_quality")
    if before:
        rows.insert(roles.index("student"), ("student before training", before))
    for role, q in rows:
        label = "student without teacher (baseline)" if role == "baseline" else role
        lines.append(f"| {label} | " + " | ".join(_fmt(q.get(k)) for k in keys) + " |")
    if "distillation_gain" in report and "accuracy" in report["distillation_gain"]:
        gain = report["distillation_gain"]["accuracy"]
        lines += ["", f"Distillation gain over the baseline: {gain * 100:+.2f} accuracy points."]
    return lines


def _size_lines(report: dict[str, Any]) -> list[str]:
    """Parameters, weights, files and latency per runtime and batch; experts; the ratio."""
    models = report["models"]
    lines = ["", "## Size and latency", ""]
    sized = [r for r in ("teacher", "student") if r in models]
    header = ["model", "parameters", "weights"]
    runtimes = sorted({rt for r in sized for rt in models[r]["latency_ms"]})
    batches = sorted(
        {b for r in sized for rt in runtimes for b in models[r]["latency_ms"].get(rt, {})}, key=int
    )
    files = sorted({label for r in sized for label in models[r]["files"]})
    header += [f"{label} file" for label in files]
    shown = {rt: f"pytorch ({report['device']})" if rt == "pytorch" else rt for rt in runtimes}
    header += [f"{shown[rt]} ms @ batch {b}" for rt in runtimes for b in batches]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for role in sized:
        m = models[role]
        row = [role, _fmt(m["parameters"]), f"{m['state_bytes'] / 1024:.1f} KiB"]
        row += [
            f"{m['files'][label]['bytes'] / 1024:.1f} KiB" if label in m["files"] else "n/a"
            for label in files
        ]
        row += [_fmt(m["latency_ms"].get(rt, {}).get(b), 3) for rt in runtimes for b in batches]
        lines.append("| " + " | ".join(row) + " |")
    for role in sized:
        if "active_parameters" in models[role]:
            m = models[role]
            lines += [
                "",
                f"The {role} is a mixture of experts: {_fmt(m['active_parameters'])} of its "
                f"{_fmt(m['parameters'])} parameters are active for a token.",
            ]
    if "compression" in report:
        lines += [
            "",
            f"The student has {report['compression']['parameter_ratio']:.1f}x fewer parameters.",
        ]
    return lines


def _deployment_lines(report: dict[str, Any]) -> list[str]:
    """Every artifact: size, the task metric, p50 latency per batch and the speedup over the
    teacher's first fp32 artifact (`onnx`, `hf`: the deployment a student replaces)."""
    models, metric = report["models"], report.get("metric")
    teacher = models.get("teacher", {})
    fp32 = next(
        (label for label, file in teacher.get("files", {}).items() if "quality" not in file),
        "onnx",
    )
    reference = teacher.get("latency_ms", {}).get(fp32, {})
    rows = []
    batches: list[str] = []
    for role in ("teacher", "student"):
        for label, file in models.get(role, {}).get("files", {}).items():
            latency = models[role]["latency_ms"].get(label, {})
            batches = batches or sorted(latency, key=int)
            # a lossy artifact has scores of its own; any other was verified equal to
            # PyTorch, so PyTorch's score is its score
            value = file.get("quality", models[role]["quality"]).get(metric)
            speedups = [
                f"{reference[b] / latency[b]:.2f}x"
                if reference.get(b) and latency.get(b)
                else "n/a"
                for b in batches
            ]
            rows.append(
                [f"{role} {label}", f"{file['bytes'] / 1024:.1f} KiB", _fmt(value)]
                + [_fmt(latency.get(b), 3) for b in batches]
                + speedups
            )
    if not rows or metric is None:
        return []
    header = ["artifact", "file", metric]
    header += [f"p50 ms @ {b}" for b in batches] + [f"vs teacher {fp32} @ {b}" for b in batches]
    return [
        "",
        "## Deployment",
        "",
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
        *_generation_lines(models),
    ]


def _generation_lines(models: dict[str, Any]) -> list[str]:
    """Greedy generation speed of artifacts that generate (causal LMs with a KV cache)."""
    rates = [
        (f"{role} {label}", rate)
        for role in ("teacher", "student")
        for label, rate in models.get(role, {}).get("generation_tokens_per_s", {}).items()
    ]
    if not rates:
        return []
    shown = ", ".join(f"{name} {rate:.1f}" for name, rate in rates)
    return [
        "",
        f"Generation in onnxruntime with the KV cache, batch 1, {GENERATED_TOKENS} greedy "
        f"tokens after a prompt of up to {PROMPT_TOKENS}: {shown} tokens/s.",
    ]


def _stage_lines(stages: list[dict[str, Any]]) -> list[str]:
    """One row per stage: its teacher, data and losses, and the final task's metrics after it."""
    keys = list(stages[-1]["task_eval"])
    lines = [
        "",
        "## Stages",
        "",
        "Metrics on the last stage's eval set, after each stage.",
        "",
        "| stage | steps | teacher | data | losses | " + " | ".join(keys) + " |",
        "|---" * (5 + len(keys)) + "|",
    ]
    for stage in stages:
        teacher = stage.get("teacher") or {}
        model = teacher.get("model")
        model = model.get("package") if isinstance(model, dict) else model
        source = stage["data"].get("kwargs", {}).get("source", stage["data"].get("loader"))
        losses = ", ".join(loss["name"] for loss in stage["losses"])
        values = " | ".join(_fmt(stage["task_eval"].get(k)) for k in keys)
        lines.append(
            f"| {stage['name']} | {stage['steps']} | {model or 'none'} | {source} | {losses} | {values} |"
        )
    return lines


def _eval_metric(history: list[dict[str, Any]]) -> str | None:
    for record in history:
        for key in record:
            if key.startswith("eval/"):
                return "eval/accuracy" if "eval/accuracy" in record else key
    return None


def _plot_curves(report: dict[str, Any], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {"distilled": report["history"]}
    if "baseline" in report["models"]:
        runs["baseline (no teacher)"] = report["models"]["baseline"]["history"]
    metric = _eval_metric(report["history"]) or "eval/accuracy"
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for label, history in runs.items():
        train = [r for r in history if "loss" in r and "event" not in r]
        evals = [r for r in history if metric in r]
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=label)
        ax_acc.plot([r["step"] for r in evals], [r[metric] for r in evals], marker="o", label=label)
    step = 0
    for stage in report.get("stages", []):  # staged runs: a line where each stage begins
        for ax in (ax_loss, ax_acc):
            ax.axvline(step, color="grey", alpha=0.4, linestyle="--")
        ax_loss.annotate(
            stage["name"],
            (step, 0.98),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            rotation=90,
            va="top",
            ha="right",
        )
        step += stage["steps"]
    ax_loss.set(title="training loss (weighted sum)", xlabel="step", yscale="log")
    ax_acc.set(title=metric.replace("/", " "), xlabel="step")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
