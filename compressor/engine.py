"""The training loop: flat on purpose, so it reads top to bottom.

Batches are a pure function of (seed, step), and checkpoints carry optimizer, schedule and
RNG state, so a resumed run follows the same loss trajectory as an uninterrupted one.
"""

from __future__ import annotations

import collections
import functools
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from compressor import distributed
from compressor.checkpoint import Checkpoint, Checkpoints, TrainState
from compressor.distributed import Parallel
from compressor.errors import CompressorError, RecipeError, RunFailed, TrainingStopped, failure
from compressor.metrics import Metrics
from compressor.progress import Progress
from compressor.recipe import DivergenceGuard
from compressor.step import BACKWARD_PART, DistillPlan, StepFailed, backward
from compressor.teacher_cache import TeacherCache
from compressor.world import World


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
    """Set up (resuming at the last checkpoint when asked), then one step after another; a
    step is read back, evaluated and checkpointed when the recipe asks for it."""
    cfg, world = plan.recipe.train, distributed.current()
    _check_split(plan, world)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpoints(run_dir / "checkpoints", world, cfg.keep_checkpoints)
    resumed = checkpoints.resume_point() if resume else None
    losses = nn.ModuleList([bound.term for bound in plan.losses])
    if resumed is not None:  # before the step is wrapped: FSDP shards the weights it finds
        checkpoints.restore_weights(resumed, plan.student_graph, losses)
    parallel = Parallel(plan, world, cfg.distributed)
    optimizer = plan.optimizer.build(plan.trainable_parameters())
    scheduler = plan.schedule.build(optimizer, cfg.steps)
    state = TrainState(plan.student_graph, losses, parallel.module, optimizer, scheduler)
    start = checkpoints.restore(resumed, state) if resumed is not None else 0
    if resumed is None:
        torch.manual_seed(plan.recipe.seed)
    metrics = Metrics(run_dir, plan.hooks, world, None if resumed is None else start)
    cache = _teacher_cache(plan, run_dir, start if resumed is not None else None)
    _show_teacher_share(parallel, world)
    bar = Progress(cfg.steps, start, enabled=progress and world.leader)
    if start == 0:  # the student as it starts: what distillation improves on
        _log_scores(plan, metrics, bar, 0, _score(plan, parallel, world, 0))
    stepper = Stepper(plan, parallel, world, state, cache)
    reader = Readback(plan, world, metrics, Divergence(cfg.divergence, metrics.earlier()))
    scores: dict[str, float] = {}
    began = time.perf_counter()
    for step in range(start, cfg.steps):
        done = step + 1
        evaluate_now = done % cfg.eval_every == 0 or done == cfg.steps
        checkpoint_now = done % cfg.checkpoint_every == 0 or done == cfg.steps
        read_now = evaluate_now or checkpoint_now or done % cfg.log_every == 0
        reader.add(stepper.run(step, measure_norm=read_now))
        if read_now:
            reader.read(bar, checkpoints.last)
        bar.advance(done)
        if evaluate_now:
            with bar.paused():
                scores = _score(plan, parallel, world, done)
            _log_scores(plan, metrics, bar, done, scores)
        if checkpoint_now:
            with bar.paused():
                _save_checkpoint(checkpoints, done, state, cache, bar)
    bar.close()
    parallel.close()  # the trained weights whole in the plain modules, on every rank
    seconds = time.perf_counter() - began
    history = metrics.history()
    final = scores if start < cfg.steps else _score(plan, parallel, world, cfg.steps)
    summary = cache.stats.summary() if cache is not None else None
    return TrainResult(run_dir, cfg.steps, final, _initial(history), history, seconds, summary)


class StepValues(NamedTuple):
    """One step's values, left on the device until read back."""

    step: int  # steps done, this one included
    terms: list[torch.Tensor]  # this rank's share of each unweighted term
    grad_norm: torch.Tensor
    lr: float


class Stepper:
    """One optimizer step. The global batch is sliced for this rank and cut into micro-batches.
    A step split across ranks or micro-batches weights each part's terms by its share of the
    step's units (samples or scored tokens): the parts then add up to the whole batch's terms,
    and the ranks' gradients (averaged by DDP and FSDP, hence the world size) to its gradient.
    One process, one micro-batch: the terms as they are. Each term's backward starts from its
    weight (`backward`); logged values are weighted when read back."""

    def __init__(
        self,
        plan: DistillPlan,
        parallel: Parallel,
        world: World,
        state: TrainState,
        cache: TeacherCache | None,
    ):
        self.plan, self.parallel, self.world, self.cache = plan, parallel, world, cache
        self.optimizer, self.scheduler = state.optimizer, state.scheduler
        self.params = plan.trainable_parameters()  # as the optimizer got them (after wrapping)
        self.lengths = plan.data.lengths() if plan.recipe.data.group_by_length else None
        self.split = world.size > 1 or plan.recipe.train.grad_accum > 1
        self.seeds = plan.loss_seeds()
        self.unmeasured = torch.zeros((), device=plan.device)  # a norm not read back
        self.steps_schedule = not plan.schedule.constant()

    def run(self, step: int, measure_norm: bool) -> StepValues:
        began = time.perf_counter()
        try:
            terms = self._forward_backward(step)
        except CompressorError:
            raise
        except StepFailed as exc:
            raise RunFailed(f"training step {step + 1}: {exc.part.name}", exc.cause) from exc.cause
        except Exception as exc:
            raise RunFailed(f"training step {step + 1}: {BACKWARD_PART.name}", exc) from exc
        if self.split:  # what is logged is this rank's share of the terms
            terms = [t / self.world.size for t in terms]
        grad_norm = distributed.whole(self._grad_norm(measure_norm))
        self.optimizer.step()
        if self.steps_schedule:
            self.scheduler.step()
        if self.cache is not None:  # host time: on a GPU it trails the device by a few steps
            self.cache.stats.record(self.cache.last_hit, time.perf_counter() - began)
        return StepValues(step + 1, terms, grad_norm, float(self.scheduler.get_last_lr()[0]))

    def _forward_backward(self, step: int) -> list[torch.Tensor]:
        """The step's terms, summed over its micro-batches in fp32, gradients accumulated."""
        plan, world, recipe = self.plan, self.world, self.plan.recipe
        n = len(plan.data.train)
        indices = batch_indices(step, n, recipe.data.batch_size, recipe.seed, self.lengths)
        parts = [world.slice(indices)]
        if recipe.train.grad_accum > 1:
            parts = [p for p in parts[0].tensor_split(recipe.train.grad_accum) if len(p)]
        batches = [plan.data.batch("train", p, plan.device) for p in parts]
        portions: list[torch.Tensor | None] = [None] * len(parts)
        if self.split:
            units = [plan.loss_units(x, y) for x, y in batches]
            whole = world.sum(torch.stack(units).sum(0)).clamp(min=1)
            portions = [u / whole * world.size for u in units]
        step_terms: list[torch.Tensor] = []
        self.optimizer.zero_grad(set_to_none=True)
        for i, ((x, y), part, portion) in enumerate(zip(batches, parts, portions, strict=True)):
            with self.parallel.accumulating(last=i == len(parts) - 1):
                # the cache keys its values by sample, so only it needs the indices
                keys = part.tolist() if self.cache is not None else []
                terms = list(self.parallel.terms(x, y, self.cache, keys).values())
                if portion is not None:
                    terms = [t * w for t, w in zip(terms, portion.tolist(), strict=True)]
                backward(terms, self.seeds)
            done = [t.detach().float() for t in terms]  # a float32 term is returned as it is
            step_terms = (
                [a + b for a, b in zip(step_terms, done, strict=True)] if step_terms else done
            )
        return step_terms

    def _grad_norm(self, measure: bool) -> torch.Tensor:
        """Clipped, or measured on steps that are read back (about 5% of a small model's step):
        a non-finite gradient elsewhere makes the next loss non-finite, and checkpoint steps
        are always read, so a NaN gradient never reaches a checkpoint."""
        clip = self.plan.recipe.train.grad_clip
        if clip is not None:
            return nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        if measure:
            grads = [p.grad for p in self.params if p.grad is not None]
            return nn.utils.get_total_norm(grads, foreach=True)
        return self.unmeasured


class Readback:
    """Loss values and gradient norms are read back (and checked) only when logged, evaluated
    or checkpointed: on a GPU every read is a device sync. A bad step is still reported at the
    step it appeared, and no checkpoint is written after it."""

    def __init__(self, plan: DistillPlan, world: World, metrics: Metrics, guard: Divergence):
        self.world, self.metrics, self.guard = world, metrics, guard
        self.log_every, self.last_step = plan.recipe.train.log_every, plan.recipe.train.steps
        self.labels = [bound.label for bound in plan.losses]
        self.weights = [bound.weight for bound in plan.losses]
        self.pending: list[StepValues] = []

    def add(self, values: StepValues) -> None:
        self.pending.append(values)

    def read(self, bar: Progress, last_good: Checkpoint | None) -> None:
        """Log the pending steps; stop on the first step whose loss is not finite or blows
        up, or whose gradient norm is not finite."""
        # one stack of every value (it promotes a bf16 norm): [steps, terms + grad norm]; a
        # few ops and one copy to the host, as they run cold once every few steps
        rows = torch.stack([v for p in self.pending for v in (*p.terms, p.grad_norm)])
        rows = rows.view(len(self.pending), -1)
        if self.world.size > 1:  # each rank's share of the terms (one norm), summed in float64
            rows = rows.double()
            rows[:, :-1] = self.world.sum(rows[:, :-1])
        for values, row in zip(self.pending, rows.tolist(), strict=True):
            *shares, grad_norm = row
            weighted = [value * weight for value, weight in zip(shares, self.weights, strict=True)]
            terms = dict(zip(self.labels, weighted, strict=True))
            total = math.fsum(weighted)
            step = values.step
            problem = self.guard.problem(total, grad_norm)
            if problem is not None:
                event, message = problem
                record = {"step": step, "event": event, "loss": total, **terms}
                self.metrics.log({**record, "grad_norm": grad_norm})
                bar.close()
                raise TrainingStopped(_stopped(step, message, terms, last_good))
            if step % self.log_every == 0 or step == self.last_step:
                record = {"step": step, "loss": total, **terms, "grad_norm": grad_norm}
                self.metrics.log({**record, "lr": values.lr})
        bar.show_terms({"loss": total, **terms})
        self.pending.clear()


def _teacher_cache(plan: DistillPlan, run_dir: Path, resumed_at: int | None) -> TeacherCache | None:
    """The teacher's cached outputs: read back up to a resumed step, else started afresh."""
    if plan.cache_layout is None:
        return None
    cache = TeacherCache(plan.cache_layout, run_dir / "teacher_cache")
    if resumed_at is None:
        cache.clear_folder()
    else:
        cache.load(resumed_at)
    return cache


def _show_teacher_share(parallel: Parallel, world: World) -> None:
    """What sharding the teacher saves, shown even with --quiet."""
    share = parallel.teacher_share()
    if share is not None and world.leader:
        held, total = share
        print(
            f"fsdp: each rank holds {held:,} of the teacher's {total:,} parameters "
            f"({held / total:.1%}, {world.size} ranks)",
            file=sys.stderr,
            flush=True,
        )


def _score(plan: DistillPlan, parallel: Parallel, world: World, step: int) -> dict[str, float]:
    with failure(f"evaluation at step {step}: the student's eval graph"), parallel.full_weights():
        return plan.evaluator(plan.student_eval_graph, shard=world)


def _log_scores(
    plan: DistillPlan, metrics: Metrics, bar: Progress, step: int, scores: dict[str, float]
) -> None:
    """An evaluation's scores and what each loss observed; the first (step 0) is logged alone."""
    seen = (
        {
            f"{bound.label}/{name}": value
            for bound in plan.losses
            for name, value in bound.term.observed().items()
        }
        if step > 0
        else {}
    )
    if not (scores or seen):  # a stage may have no metric of its own (general distillation)
        return
    metrics.log({"step": step, **{f"eval/{k}": v for k, v in scores.items()}, **seen})
    if step > 0:
        bar.note(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))


def _save_checkpoint(
    checkpoints: Checkpoints,
    step: int,
    state: TrainState,
    cache: TeacherCache | None,
    bar: Progress,
) -> None:
    last_good = checkpoints.last
    try:
        if cache is not None:  # before the checkpoint that counts on it
            cache.save(step)
        checkpoints.save(step, state)
    except Exception as exc:  # safetensors reports I/O errors as its own type
        bar.close()
        raise CompressorError(_unwritten(step, checkpoints.folder, exc, last_good)) from exc


def _initial(history: list[dict[str, Any]]) -> dict[str, float]:
    """The scores logged at step 0, before training."""
    return {
        k.removeprefix("eval/"): v
        for r in history
        if r["step"] == 0
        for k, v in r.items()
        if k.startswith("eval/")
    }


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
