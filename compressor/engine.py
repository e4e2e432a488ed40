"""The training loop: flat on purpose, so it reads top to bottom.

Batches are a pure function of (seed, step), and checkpoints carry optimizer, schedule and
RNG state, so a resumed run follows the same loss trajectory as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from compressor.errors import CompressorError, TrainingStopped
from compressor.evaluate import evaluate
from compressor.graph_pass import (
    OUTPUT,
    draw_inputs,
    graph_input_specs,
    graph_inputs,
    split_outputs,
)
from compressor.loading import batch_size, call_model, collate
from compressor.losses import LossInputs
from compressor.optim import OptimizerFactory, ScheduleFactory
from compressor.plan import DistillPlan

METRICS = "metrics.jsonl"


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_eval: dict[str, float]
    initial_eval: dict[str, float] = field(default_factory=dict)  # before the first step
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of the batch at `step`: epoch-wise shuffles seeded by (seed, epoch), last partial
    batch dropped."""
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[position * batch_size : (position + 1) * batch_size]


def train(
    plan: DistillPlan, run_dir: Path, resume: bool = False, progress: bool = True
) -> TrainResult:
    recipe, cfg, device = plan.recipe, plan.recipe.train, plan.device
    pm = plan.registry.pm
    losses = nn.ModuleList([bound.term for bound in plan.losses])
    optimizer_factory: OptimizerFactory = plan.registry.create(
        "optimizer", cfg.optimizer.name, cfg.optimizer.options
    )
    schedule_factory: ScheduleFactory = plan.registry.create(
        "schedule", cfg.schedule.name, cfg.schedule.options
    )
    params = plan.trainable_parameters()
    optimizer = optimizer_factory.build(params)
    scheduler = schedule_factory.build(optimizer, cfg.steps)
    checkpoints = run_dir / "checkpoints"
    metrics_path = run_dir / METRICS
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    n_train = len(plan.data.train)
    # inputs that passes added (MAE's kept patches): what to draw, and which graph takes what
    input_specs = graph_input_specs([plan.student_graph, plan.teacher_graph])
    student_inputs = list(graph_inputs(plan.student_graph))
    teacher_inputs = (
        list(graph_inputs(plan.teacher_graph)) if plan.teacher_graph is not None else []
    )

    run_dir.mkdir(parents=True, exist_ok=True)
    start, last_good = 0, None
    if resume:
        last_good = latest_checkpoint(checkpoints)
        if last_good is None:
            raise CompressorError(f"--resume: no checkpoint in {checkpoints}; run without --resume")
        state = load_checkpoint(last_good, plan.student_graph, losses)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start = last_good.step
        _truncate_metrics(metrics_path, start)
    else:
        torch.manual_seed(recipe.seed)
        metrics_path.unlink(missing_ok=True)

    def log(record: dict[str, Any]) -> None:
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        pm.hook.compressor_metrics_logged(record=record, run_dir=run_dir)

    def checkpoint(step: int) -> Checkpoint:
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        }
        # the training graph holds the student's weights and the modules passes added to it
        return save_checkpoint(
            checkpoints, step, plan.student_graph, losses, state, cfg.keep_checkpoints
        )

    def score() -> dict[str, float]:
        return evaluate(
            plan.student_eval_graph,
            plan.data,
            recipe.data.eval_batch_size,
            device,
            plan.reference_embeddings(),
        )

    initial_scores = score() if start == 0 else {}
    if initial_scores:  # the student as it starts: what distillation improves on
        log({"step": 0, **{f"eval/{k}": v for k, v in initial_scores.items()}})
    bar = Progress(cfg.steps, start, enabled=progress)
    began = time.perf_counter()
    for step in range(start, cfg.steps):
        x, y = collate(
            plan.data.train,
            batch_indices(step, n_train, recipe.data.batch_size, recipe.seed),
            device,
        )
        extra = draw_inputs(input_specs, batch_size(x), device)  # one draw for both graphs
        with autocast:
            s_result = call_model(plan.student_graph, x, **{n: extra[n] for n in student_inputs})
            s_out, s_taps = split_outputs(plan.student_graph, s_result)  # logits [B, C], taps
            student = {OUTPUT: s_out, **s_taps}
            teacher: dict[str, torch.Tensor] = {}
            if plan.teacher_graph is not None:
                with torch.no_grad():
                    t_result = call_model(
                        plan.teacher_graph, x, **{n: extra[n] for n in teacher_inputs}
                    )
                    t_out, t_taps = split_outputs(plan.teacher_graph, t_result)
                teacher = {OUTPUT: t_out, **t_taps}
            inputs = LossInputs(student, teacher, y, x)
            terms = {b.label: b.weight * b.term(inputs) for b in plan.losses}
            loss = torch.stack([t.float() for t in terms.values()]).sum()
        values = {name: float(t.detach()) for name, t in terms.items()}
        total = float(loss.detach())
        if not math.isfinite(total):
            log({"step": step + 1, "event": "non_finite_loss", "loss": total, **values})
            bar.close()
            kept = (
                f"the last good checkpoint is {last_good.path}"
                if last_good
                else "no checkpoint was written yet"
            )
            raise TrainingStopped(
                f"loss became {total} at step {step + 1} (terms: "
                + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                + f"); training stopped and {kept}.\n  try a lower learning rate or train.grad_clip, "
                "then continue with --resume"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()

        done = step + 1
        bar.update(done, recipe.data.batch_size, {"loss": total, **values})
        if done % cfg.log_every == 0 or done == cfg.steps:
            log({"step": done, "loss": total, **values, "lr": scheduler.get_last_lr()[0]})
        if done % cfg.eval_every == 0 or done == cfg.steps:
            scores = score()
            if scores:  # a stage may have no metric of its own (general distillation)
                log({"step": done, **{f"eval/{k}": v for k, v in scores.items()}})
                bar.note(
                    f"eval at step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
                )
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            last_good = checkpoint(done)
    bar.close()
    history = read_metrics(metrics_path)
    initial = {
        k.removeprefix("eval/"): v
        for r in history
        if r["step"] == 0
        for k, v in r.items()
        if k.startswith("eval/")
    }
    return TrainResult(run_dir, cfg.steps, score(), initial, history, time.perf_counter() - began)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, step: int) -> None:
    """A killed run may have logged past its last checkpoint; resume rewrites those steps."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class Progress:
    """One status line: step, loss terms, samples/s, ETA. Redrawn on a terminal, printed every
    few percent otherwise (logs and CI)."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.total, self.start, self.enabled = total, start, enabled
        self.tty = sys.stderr.isatty()
        self.began = time.perf_counter()
        self.samples = 0
        self.last_print = -1

    def update(self, step: int, batch: int, values: dict[str, float]) -> None:
        self.samples += batch
        if not self.enabled:
            return
        elapsed = max(time.perf_counter() - self.began, 1e-9)
        rate = (step - self.start) / elapsed
        eta = (self.total - step) / rate if rate > 0 else 0.0
        terms = " ".join(f"{k}={v:.4f}" for k, v in values.items())
        line = f"step {step}/{self.total} {terms} | {self.samples / elapsed:.0f} samples/s | ETA {eta:.0f}s"
        if self.tty:
            sys.stderr.write("\r" + line[:200] + "\033[K")
            sys.stderr.flush()
        elif step * 10 // self.total != self.last_print or step == self.total:
            self.last_print = step * 10 // self.total
            print(line, file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            prefix = "\r\033[K" if self.tty else ""
            print(prefix + text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
