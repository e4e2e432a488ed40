"""The training loop: flat on purpose, so it reads top to bottom.

Batches are a pure function of (seed, step), and checkpoints carry optimizer, schedule and
RNG state, so a resumed run follows the same loss trajectory as an uninterrupted one.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from compressor import distributed
from compressor.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_distributed_checkpoint,
)
from compressor.distributed import Parallel, is_distributed_checkpoint, load_distributed
from compressor.errors import CompressorError, RecipeError, RunFailed, TrainingStopped, failure
from compressor.recipe import DivergenceGuard
from compressor.step import BACKWARD_PART, DistillPlan, StepFailed, backward
from compressor.teacher_cache import TeacherCache

METRICS = "metrics.jsonl"


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_eval: dict[str, float]
    initial_eval: dict[str, float] = field(default_factory=dict)  # before the first step
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    teacher_cache: dict[str, Any] | None = None  # CacheStats.summary() of a cached teacher


# Batches sorted together by length: enough for batches of near-equal lengths, few enough that
# an epoch's first and last windows hold alike texts (Hugging Face's grouped sampler uses 50).
LENGTH_WINDOW = 50


def batch_indices(
    step: int, n: int, batch_size: int, seed: int, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices of the batch at `step`: epoch-wise shuffles seeded by (seed, epoch), last partial
    batch dropped. With `lengths` (one per item), each window of LENGTH_WINDOW batches of the
    shuffle is sorted by length before it is cut into batches, and the epoch's batches are
    then shuffled: a batch holds texts of similar length and pads little, and the order of
    long and short batches stays random."""
    batch_size = min(batch_size, n)
    epoch, position = divmod(step, n // batch_size)
    return _epoch_batches(n, batch_size, seed, epoch, lengths)[position]


@functools.lru_cache(maxsize=1)
def _epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, lengths: torch.Tensor | None
) -> torch.Tensor:
    """[batches, batch_size]: one epoch's draw, made once and read by each of its steps (the
    cache keeps `lengths` alive, so its identity stands for its contents)."""
    per_epoch = n // batch_size
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator)[: per_epoch * batch_size]
    if lengths is None:
        return order.view(per_epoch, batch_size)
    windows = order.split(LENGTH_WINDOW * batch_size)
    order = torch.cat([w[lengths[w].argsort(descending=True, stable=True)] for w in windows])
    return order.view(per_epoch, batch_size)[torch.randperm(per_epoch, generator=generator)]


def train(
    plan: DistillPlan, run_dir: Path, resume: bool = False, progress: bool = True
) -> TrainResult:
    recipe, cfg, device = plan.recipe, plan.recipe.train, plan.device
    world = distributed.current()
    leader = world.leader  # the one writer of metrics and checkpoint pointers
    losses = nn.ModuleList([bound.term for bound in plan.losses])
    checkpoints = run_dir / "checkpoints"
    metrics_path = run_dir / METRICS
    n_train = len(plan.data.train)
    lengths = plan.data.lengths() if recipe.data.group_by_length else None
    _check_split(plan, world)
    # Loss values and gradient norms are read back (and checked) only when logged, evaluated
    # or checkpointed: on a GPU every read is a device sync. A bad step is still reported at
    # the step it appeared, and no checkpoint is written after it.

    run_dir.mkdir(parents=True, exist_ok=True)
    cache = None
    if plan.cache_layout is not None:
        cache = TeacherCache(plan.cache_layout, run_dir / "teacher_cache")
    start, last_good, saved = 0, None, None
    if resume:
        last_good = latest_checkpoint(checkpoints)
        if last_good is None:
            raise CompressorError(f"--resume: no checkpoint in {checkpoints}; run without --resume")
        start = last_good.step
        if not is_distributed_checkpoint(last_good.path):  # weights before any wrapping
            saved = load_checkpoint(last_good, plan.student_graph, losses)
    # the step across ranks; under FSDP the graphs now hold shards, so parameters come after
    parallel = Parallel(plan, world, cfg.distributed)
    params = plan.trainable_parameters()
    optimizer = plan.optimizer.build(params)
    scheduler = plan.schedule.build(optimizer, cfg.steps)
    if resume:
        assert last_good is not None
        if saved is None:
            saved = load_distributed(
                last_good.path,
                parallel.module,
                optimizer,
                {"scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()},
            )
        elif world.size > 1:
            names = distributed.trainable_names(parallel.module)
            distributed.load_plain_optimizer(parallel.module, names, optimizer, saved["optimizer"])
        else:
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        if leader:
            _truncate_metrics(metrics_path, start)
        if cache is not None:
            cache.load(start)
    else:
        torch.manual_seed(recipe.seed)
        if leader:
            metrics_path.unlink(missing_ok=True)
        if cache is not None:
            cache.clear_folder()
    share = parallel.teacher_share()
    if share is not None and leader:  # what sharding saves, shown even with --quiet
        held, total = share
        print(
            f"fsdp: each rank holds {held:,} of the teacher's {total:,} parameters "
            f"({held / total:.1%}, {world.size} ranks)",
            file=sys.stderr,
            flush=True,
        )

    def log(record: dict[str, Any]) -> None:
        if not leader:
            return
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        plan.hooks.compressor_metrics_logged(record=record, run_dir=run_dir)

    def score(step: int) -> dict[str, float]:
        with (
            failure(f"evaluation at step {step}: the student's eval graph"),
            parallel.full_weights(),
        ):
            return plan.evaluator(plan.student_eval_graph, shard=world)

    bar = Progress(cfg.steps, start, enabled=progress and leader)
    initial_scores = score(0) if start == 0 else {}
    if initial_scores:  # the student as it starts: what distillation improves on
        log({"step": 0, **{f"eval/{k}": v for k, v in initial_scores.items()}})
    labels = [bound.label for bound in plan.losses]
    scores: dict[str, float] = {}
    # (step, detached terms, grad norm, lr) of the steps not read back yet: stacked only when
    # read, so a step adds no tensor ops of its own for logging
    pending: list[tuple[int, list[torch.Tensor], torch.Tensor, float]] = []

    earlier = world.from_leader(read_metrics(metrics_path) if resume and leader else [])
    guard = Divergence(cfg.divergence, earlier)

    def read_back() -> None:
        """Log the pending steps; stop on the first step whose loss is not finite or blows
        up, or whose gradient norm is not finite."""
        # one stack of every value (it promotes a bf16 norm): [steps, terms + grad norm]; a
        # few ops and one copy to the host, as they run cold once every few steps
        rows = torch.stack([v for _, terms, norm, _ in pending for v in (*terms, norm)])
        rows = rows.view(len(pending), -1)
        if world.size > 1:  # each rank's share of the terms (one norm), summed in float64
            rows = rows.double()
            rows[:, :-1] = world.sum(rows[:, :-1])
        for (step, _, _, lr), row in zip(pending, rows.tolist(), strict=True):
            *shares, grad_norm = row
            loss_values = [value * weight for value, weight in zip(shares, weights, strict=True)]
            terms = dict(zip(labels, loss_values, strict=True))
            total = math.fsum(loss_values)
            problem = guard.problem(total, grad_norm)
            if problem is not None:
                event, message = problem
                log({"step": step, "event": event, "loss": total, **terms, "grad_norm": grad_norm})
                bar.close()
                raise TrainingStopped(_stopped(step, message, terms, last_good))
            if step % cfg.log_every == 0 or step == cfg.steps:
                log({"step": step, "loss": total, **terms, "grad_norm": grad_norm, "lr": lr})
        bar.show_terms({"loss": total, **terms})
        pending.clear()

    # A step split across ranks or micro-batches weights each part's terms by its share of
    # the step's units (samples or scored tokens): the parts then add up to the whole batch's
    # terms, and the ranks' gradients (averaged by DDP and FSDP, hence the world size) to its
    # gradient. One process, one micro-batch: the terms as they are.
    split = world.size > 1 or cfg.grad_accum > 1
    # The terms come unweighted and each one's backward starts from its weight (`backward`);
    # logged values are weighted when read back.
    weights = [bound.weight for bound in plan.losses]
    seeds = plan.loss_seeds()
    unmeasured = torch.zeros((), device=device)  # the gradient norm of a step not read back
    steps_schedule = not plan.schedule.constant()
    began = time.perf_counter()
    for step in range(start, cfg.steps):
        indices = batch_indices(step, n_train, recipe.data.batch_size, recipe.seed, lengths)
        parts = [world.slice(indices)]
        if cfg.grad_accum > 1:
            parts = [p for p in parts[0].tensor_split(cfg.grad_accum) if len(p)]
        batches = [plan.data.batch("train", p, device) for p in parts]
        portions: list[torch.Tensor | None] = [None] * len(parts)
        if split:
            units = [plan.loss_units(x, y) for x, y in batches]
            whole = world.sum(torch.stack(units).sum(0)).clamp(min=1)
            portions = [u / whole * world.size for u in units]
        step_began = time.perf_counter()
        step_terms: list[torch.Tensor] = []
        try:
            optimizer.zero_grad(set_to_none=True)
            for i, ((x, y), part, portion) in enumerate(zip(batches, parts, portions, strict=True)):
                with parallel.accumulating(last=i == len(parts) - 1):
                    # the cache keys its values by sample, so only it needs the indices
                    keys = part.tolist() if cache is not None else []
                    terms = list(parallel.terms(x, y, cache, keys).values())
                    if portion is not None:
                        terms = [t * w for t, w in zip(terms, portion.tolist(), strict=True)]
                    backward(terms, seeds)
                # summed over micro-batches in fp32 (a float32 term is returned as it is)
                done_terms = [t.detach().float() for t in terms]
                step_terms = (
                    [a + b for a, b in zip(step_terms, done_terms, strict=True)]
                    if step_terms
                    else done_terms
                )
        except CompressorError:
            raise
        except StepFailed as exc:
            raise RunFailed(f"training step {step + 1}: {exc.part.name}", exc.cause) from exc.cause
        except Exception as exc:
            raise RunFailed(f"training step {step + 1}: {BACKWARD_PART.name}", exc) from exc
        if split:  # what is logged is this rank's share of the terms
            step_terms = [t / world.size for t in step_terms]
        done = step + 1
        evaluate_now = done % cfg.eval_every == 0 or done == cfg.steps
        checkpoint_now = done % cfg.checkpoint_every == 0 or done == cfg.steps
        read_now = evaluate_now or checkpoint_now or done % cfg.log_every == 0
        # The gradient norm stays on the device until read back with the loss terms. Without
        # clipping it is computed only on steps that are read back (about 5% of a small
        # model's step): a non-finite gradient elsewhere makes the next loss non-finite, and
        # checkpoint steps are always read, so a NaN gradient never reaches a checkpoint.
        if cfg.grad_clip is not None:
            grad_norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
        elif read_now:
            grads = [p.grad for p in params if p.grad is not None]
            grad_norm = nn.utils.get_total_norm(grads, foreach=True)
        else:
            grad_norm = unmeasured
        grad_norm = distributed.whole(grad_norm)
        optimizer.step()
        if steps_schedule:
            scheduler.step()
        if cache is not None:  # host time: on a GPU it trails the device by a few steps
            cache.stats.record(cache.last_hit, time.perf_counter() - step_began)

        pending.append((done, step_terms, grad_norm, float(scheduler.get_last_lr()[0])))
        if read_now:
            read_back()
        bar.advance(done)
        if evaluate_now:
            with bar.paused():
                scores = score(done)
            seen = {
                f"{bound.label}/{name}": value
                for bound in plan.losses
                for name, value in bound.term.observed().items()
            }
            if scores or seen:  # a stage may have no metric of its own (general distillation)
                log({"step": done, **{f"eval/{k}": v for k, v in scores.items()}, **seen})
                bar.note(
                    f"eval at step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
                )
        if checkpoint_now:
            with bar.paused():
                state = {"scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}
                # the training graph holds the student's weights and what passes added to it
                try:
                    if cache is not None:  # before the checkpoint that counts on it
                        cache.save(done)
                    if world.size > 1:  # every rank its shards, the optimizer's included
                        last_good = save_distributed_checkpoint(
                            checkpoints,
                            done,
                            world,
                            parallel.module,
                            optimizer,
                            state,
                            cfg.keep_checkpoints,
                        )
                    else:
                        state["optimizer"] = optimizer.state_dict()
                        last_good = save_checkpoint(
                            checkpoints,
                            done,
                            plan.student_graph,
                            losses,
                            state,
                            cfg.keep_checkpoints,
                        )
                except Exception as exc:  # safetensors reports I/O errors as its own type
                    bar.close()
                    raise CompressorError(_unwritten(done, checkpoints, exc, last_good)) from exc
    bar.close()
    parallel.close()  # the trained weights whole in the plain modules, on every rank
    seconds = time.perf_counter() - began
    history = world.from_leader(read_metrics(metrics_path) if leader else [])
    initial = {
        k.removeprefix("eval/"): v
        for r in history
        if r["step"] == 0
        for k, v in r.items()
        if k.startswith("eval/")
    }
    final = scores if start < cfg.steps else score(cfg.steps)  # the last step was evaluated
    summary = cache.stats.summary() if cache is not None else None
    return TrainResult(run_dir, cfg.steps, final, initial, history, seconds, summary)


def _check_split(plan: DistillPlan, world: distributed.World) -> None:
    """Every rank's every micro-batch gets at least one sample."""
    cfg, batch = plan.recipe.train, min(plan.recipe.data.batch_size, len(plan.data.train))
    if batch < world.size * cfg.grad_accum:
        raise RecipeError(
            plan.recipe.locate(("train", "grad_accum"), prefer_key=True),
            f"a batch of {batch} cannot be split into {cfg.grad_accum} micro-batches on each "
            f"of {world.size} ranks",
            f"data.batch_size >= ranks x train.grad_accum ({world.size * cfg.grad_accum})",
        )


class Divergence:
    """train.divergence: a loss that is not finite, one that is over `factor` times the median
    of the steps before it, over where it started (the first step's loss, so a loss that
    climbs back without passing its start is left alone) and over `floor` (a student that
    starts as a copy of its teacher climbs from a loss near 0 by large ratios, healthily), or
    a gradient norm that is not finite. Checked from the second step on, so a blow-up at once
    is caught at once."""

    def __init__(self, spec: DivergenceGuard | None, history: list[dict[str, Any]]):
        self.spec = spec
        self.recent: collections.deque[float] = collections.deque(maxlen=spec.window if spec else 1)
        self.started: float | None = None
        for record in history:  # a resumed run continues the window it had
            if "loss" in record and record.get("event") is None:
                self._add(float(record["loss"]))

    def _add(self, total: float) -> None:
        self.recent.append(total)
        if self.started is None:
            self.started = total

    def problem(self, total: float, grad_norm: float) -> tuple[str, str] | None:
        """(event, message) when the step must stop the run, else None."""
        if not math.isfinite(total):
            return "non_finite_loss", f"the loss became {total}"
        if self.spec is not None and not math.isfinite(grad_norm):
            return "non_finite_grad", f"the gradient norm became {grad_norm} (loss {total:.4g})"
        # the median only when the loss is above its start and the floor (rarely): it sorts the window
        spec = self.spec
        if spec is not None and self.started is not None and total > max(self.started, spec.floor):
            median = statistics.median(self.recent)
            if median > 0 and total > spec.factor * median:
                return "diverged", (
                    f"the loss diverged: {total:.4g} is over {spec.factor:g}x the median "
                    f"{median:.4g} of the steps before it and over the floor {spec.floor:g} "
                    "(train.divergence)"
                )
        self._add(total)
        return None


def _stopped(step: int, problem: str, terms: dict[str, float], last_good: Any) -> str:
    values = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
    if last_good is not None:
        kept = f"the last good checkpoint is {last_good.path}"
        then = "then continue with --resume"
    else:
        kept = "no checkpoint was written yet"
        then = "then run again"
    return (
        f"at step {step}, {problem} (terms: {values}); training stopped, nothing is exported "
        f"and {kept}.\n  try a lower learning rate or train.grad_clip, {then}"
    )


def _unwritten(step: int, folder: Path, exc: Exception, last_good: Any) -> str:
    if last_good is not None:
        kept, then = f"the last good checkpoint is {last_good.path}", "continue with --resume"
    else:
        kept, then = "no checkpoint was written yet", "run again"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return (
        f"writing the checkpoint of step {step} to {folder} failed: {reason}; {kept}. "
        f"Free space (or lift the file-size limit), then {then}"
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
        if not self.enabled:
            return
        now = time.perf_counter()
        if step > self.warmup:
            self.timed_steps += 1
            self.timed_seconds += now - self.mark
        self.mark = now
        self.bar.steady_rate = self.rate()
        self.bar.update(1)
        if not self.tty and (step * 20 // self.total != self.last_line):
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
