"""The training loop: flat on purpose, so it reads top to bottom.

Batches are a pure function of (seed, step), and checkpoints carry optimizer, schedule and
RNG state, so a resumed run follows the same loss trajectory as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from compressor.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from compressor.errors import CompressorError, RunFailed, TrainingStopped, failure
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
    losses = nn.ModuleList([bound.term for bound in plan.losses])
    params = plan.trainable_parameters()
    optimizer = plan.optimizer.build(params)
    scheduler = plan.schedule.build(optimizer, cfg.steps)
    checkpoints = run_dir / "checkpoints"
    metrics_path = run_dir / METRICS
    n_train = len(plan.data.train)
    # Loss values are read back (and checked) only when logged, evaluated or checkpointed:
    # on a GPU every read is a device sync. A non-finite loss is still reported at the step it
    # appeared, and no checkpoint is written after it.

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
        plan.hooks.compressor_metrics_logged(record=record, run_dir=run_dir)

    def score(step: int) -> dict[str, float]:
        with failure(f"evaluation at step {step}: the student's eval graph"):
            return plan.evaluator(plan.student_eval_graph)

    bar = Progress(cfg.steps, start, enabled=progress)
    initial_scores = score(0) if start == 0 else {}
    if initial_scores:  # the student as it starts: what distillation improves on
        log({"step": 0, **{f"eval/{k}": v for k, v in initial_scores.items()}})
    labels = [bound.label for bound in plan.losses]
    scores: dict[str, float] = {}
    pending: list[tuple[int, torch.Tensor, float]] = []  # (step, terms [T], lr) not yet read

    def read_back() -> None:
        """Log the pending steps; stop on the first non-finite loss among them."""
        values = torch.stack([terms for _, terms, _ in pending]).float().cpu().tolist()
        for (step, _, lr), row in zip(pending, values, strict=True):
            terms = dict(zip(labels, row, strict=True))
            total = math.fsum(row)
            if not math.isfinite(total):
                log({"step": step, "event": "non_finite_loss", "loss": total, **terms})
                bar.close()
                raise TrainingStopped(_non_finite(step, total, terms, last_good))
            if step % cfg.log_every == 0 or step == cfg.steps:
                log({"step": step, "loss": total, **terms, "lr": lr})
        bar.show_terms({"loss": total, **terms})
        pending.clear()

    began = time.perf_counter()
    for step in range(start, cfg.steps):
        indices = batch_indices(step, n_train, recipe.data.batch_size, recipe.seed)
        x, y = plan.data.batch("train", indices, device)
        try:
            terms = list(plan.loss_terms(x, y).values())
            optimizer.zero_grad(set_to_none=True)
            sum(terms[1:], terms[0]).backward()
        except CompressorError:
            raise
        except Exception as exc:
            raise RunFailed(f"training step {step + 1}: {plan.part.name}", exc) from exc
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()

        done = step + 1
        values = torch.stack([t.detach().float() for t in terms])  # [terms], read back later
        pending.append((done, values, float(scheduler.get_last_lr()[0])))
        evaluate_now = done % cfg.eval_every == 0 or done == cfg.steps
        checkpoint_now = done % cfg.checkpoint_every == 0 or done == cfg.steps
        if evaluate_now or checkpoint_now or done % cfg.log_every == 0:
            read_back()
        bar.advance(done)
        if evaluate_now:
            with bar.paused():
                scores = score(done)
            if scores:  # a stage may have no metric of its own (general distillation)
                log({"step": done, **{f"eval/{k}": v for k, v in scores.items()}})
                bar.note(
                    f"eval at step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
                )
        if checkpoint_now:
            with bar.paused():
                state = {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                }
                # the training graph holds the student's weights and what passes added to it
                last_good = save_checkpoint(
                    checkpoints, done, plan.student_graph, losses, state, cfg.keep_checkpoints
                )
    bar.close()
    seconds = time.perf_counter() - began
    history = read_metrics(metrics_path)
    initial = {
        k.removeprefix("eval/"): v
        for r in history
        if r["step"] == 0
        for k, v in r.items()
        if k.startswith("eval/")
    }
    final = scores if start < cfg.steps else score(cfg.steps)  # the last step was evaluated
    return TrainResult(run_dir, cfg.steps, final, initial, history, seconds)


def _non_finite(step: int, total: float, terms: dict[str, float], last_good: Any) -> str:
    values = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
    if last_good is not None:
        kept = f"the last good checkpoint is {last_good.path}"
        then = "then continue with --resume"
    else:
        kept = "no checkpoint was written yet"
        then = "then run again (with --overwrite)"
    return (
        f"loss became {total} at step {step} (terms: {values}); training stopped and {kept}."
        f"\n  try a lower learning rate or train.grad_clip, {then}"
    )


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, step: int) -> None:
    """A killed run may have logged past its last checkpoint; resume rewrites those steps."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class Progress:
    """Step, loss terms, steady-state rate and ETA. On a terminal a tqdm bar; otherwise (logs,
    CI) one line every 5% of the steps. The rate leaves out warm-up (the first steps, where
    kernels compile) and the time spent evaluating and checkpointing."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.total, self.start, self.enabled = total, start, enabled
        self.tty = sys.stderr.isatty()
        self.warmup = start + max(1, min(10, (total - start) // 50))
        self.timed_steps, self.timed_seconds = 0, 0.0
        self.mark = time.perf_counter()
        self.began = self.mark
        self.terms = ""
        self.last_line = -1
        self.bar = _Bar(
            total=total,
            initial=start,
            disable=not (enabled and self.tty),
            file=sys.stderr,
            unit="step",
            dynamic_ncols=True,
            leave=True,
        )

    def advance(self, step: int) -> None:
        now = time.perf_counter()
        if step > self.warmup:
            self.timed_steps += 1
            self.timed_seconds += now - self.mark
        self.mark = now
        self.bar.steady_rate = self.rate()
        self.bar.update(1)
        if self.enabled and not self.tty and (step * 20 // self.total != self.last_line):
            self.last_line = step * 20 // self.total
            print(self.line(step), file=sys.stderr, flush=True)

    def rate(self) -> float:
        """Steady-state steps per second; 0 (shown as '?') until warm-up is over."""
        return self.timed_steps / self.timed_seconds if self.timed_seconds > 0 else 0.0

    def line(self, step: int) -> str:
        return tqdm.format_meter(
            step,
            self.total,
            time.perf_counter() - self.began,
            initial=self.start,
            unit="step",
            rate=self.rate(),
            postfix=self.terms,
            ncols=0,
        )

    def show_terms(self, values: dict[str, float]) -> None:
        self.terms = " ".join(f"{k}={v:.4f}" for k, v in values.items())
        self.bar.set_postfix_str(self.terms, refresh=False)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count towards the rate."""
        try:
            yield
        finally:
            self.mark = time.perf_counter()

    def note(self, text: str) -> None:
        if self.enabled:
            if self.tty:
                self.bar.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


class _Bar(tqdm):
    """tqdm with our steady-state rate in place of its own average (which counts warm-up)."""

    steady_rate = 0.0

    @property
    def format_dict(self) -> dict[str, Any]:
        info = dict(super().format_dict)
        info["rate"] = self.steady_rate
        return info
