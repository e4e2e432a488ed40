"""`python -m compressor.bench engine`: the engine against a hand-written PyTorch loop.

The same KD task both ways, in one process: a 3-conv CNN teacher and a 2-layer MLP student
on the digits, batch 64, KD (T = 4) + CE, AdamW. The engine runs the recipe's captured
graphs with its logging, checks, final evaluation and checkpoint; the hand loop runs the
eager modules with the same batches, initialisation and maths, then evaluates. Building the
plan (loading, capture, rehearsal) and the loop's set-up are not timed, only training.

The two are interleaved step by step: each time the engine draws a training batch, the hand
loop first takes its own next step, timed apart and taken out of the engine's time. On a
shared 2-core virtual machine one second can run 30% slower than the next for reasons
outside the process; steps a few milliseconds apart see the same machine, so the ratio
holds where whole runs, even alternated, differ by more than the engine's cost. Each
round is one such run; the headline is the median of the per-round ratios, with the
fastest rounds' ratio and the CPU-time ratio beside it. Prints how far the two students'
final weights are apart: the same batches and maths, so zero with the loop's AdamW kernel
(`--unfused`); the recipe's default fused kernel rounds differently (about 1e-6).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

RECIPE = """\
name: bench-engine
seed: 0
teacher: {model: "compressor.bench.engine:cnn_teacher"}
student: {model: "compressor.bench.engine:mlp_student"}
data:
  loader: digits
  batch_size: 64
losses:
  - {name: kd, weight: 0.9, temperature: 4.0}
  - {name: ce, weight: 0.1}
train:
  steps: STEPS
  optimizer: {name: adamw, lr: 0.01, fused: FUSED}
  log_every: 10
  eval_every: STEPS
  checkpoint_every: STEPS
export: []
"""


def cnn_teacher() -> nn.Module:
    """Three convolutions, about 75k parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 96, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(96, 10),
    )


def mlp_student() -> nn.Module:
    """Two layers, about 2.4k parameters."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _hand_loop(steps: int) -> Generator[None, None, nn.Module]:
    """What a user would write: the same batches, initialisation and maths as the recipe.
    Yields once set up, then after each step; returns the student after evaluating it."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from compressor.engine import batch_indices

    images, labels = load_digits(return_X_y=True)
    x_train, x_eval, y_train, y_eval = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels
    )
    xs = torch.tensor(x_train, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    ys = torch.tensor(y_train)
    torch.manual_seed(0)
    teacher = cnn_teacher().eval().requires_grad_(False)
    torch.manual_seed(1)
    student = mlp_student().train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.01, weight_decay=0.0)
    temperature = 4.0
    yield
    for step in range(steps):
        index = batch_indices(step, len(xs), 64, 0)
        x, y = xs[index], ys[index]
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = student(x)
        kd = F.kl_div(
            F.log_softmax(s_logits / temperature, -1),
            F.log_softmax(t_logits / temperature, -1),
            log_target=True,
            reduction="batchmean",
        )
        loss = 0.9 * temperature**2 * kd + 0.1 * F.cross_entropy(s_logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss became {float(loss)}")
        yield
    with torch.no_grad():
        student.eval()
        x_held = torch.tensor(x_eval, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        accuracy = (student(x_held).argmax(-1) == torch.tensor(y_eval)).float().mean()
        student.train()
    assert 0 <= float(accuracy) <= 1
    return student


@dataclass
class Clock:
    """Wall and CPU seconds of the spans it is entered for. A plain class rather than a
    generator: what the clock itself costs outside its span counts against the engine."""

    wall: float = 0.0
    cpu: float = 0.0
    _began: tuple[float, float] = (0.0, 0.0)

    def __enter__(self) -> None:
        self._began = (time.process_time(), time.perf_counter())

    def __exit__(self, *exc: object) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.wall += wall - self._began[1]
        self.cpu += cpu - self._began[0]


def _interleaved(plan: Any, folder: Path, steps: int) -> tuple[Clock, Clock, nn.Module, nn.Module]:
    """One engine run with the hand loop's steps between its own: (engine time, loop time,
    engine student, loop student)."""
    from compressor.engine import train

    loop = _hand_loop(steps)
    next(loop)  # set up, untimed
    engine_clock, loop_clock = Clock(), Clock()
    draw = plan.data.batch

    def loop_step_then_draw(split: str, indices: Any, device: torch.device) -> Any:
        if split == "train":
            with loop_clock:
                next(loop)
        return draw(split, indices, device)

    plan.data.batch = loop_step_then_draw  # shadows the method on this one instance
    try:
        with engine_clock:
            train(plan, folder / "run", progress=False)
    finally:
        del plan.data.batch
    with loop_clock:  # the loop's evaluation, after its last step
        try:
            next(loop)
            raise AssertionError("the hand loop ran more steps than the engine")
        except StopIteration as done:
            loop_student = done.value
    # the loop's steps ran inside the engine's run: they are not the engine's time
    engine_clock.wall -= loop_clock.wall
    engine_clock.cpu -= loop_clock.cpu
    return engine_clock, loop_clock, plan.student, loop_student


def _plan(steps: int, folder: Path, fused: bool | None = None) -> Any:
    from compressor.plan import build_plan
    from compressor.recipe_file import load_recipe
    from compressor.registry import Registry

    path = folder / "recipe.yaml"
    fused_text = "null" if fused is None else str(fused).lower()
    path.write_text(RECIPE.replace("STEPS", str(steps)).replace("FUSED", fused_text))
    return build_plan(load_recipe(path), Registry.load())


def bench_engine(steps: int = 630, rounds: int = 11, fused: bool | None = None) -> float:
    """Print engine and hand-loop times side by side; returns the median per-round ratio of
    wall times (engine / loop). `fused` is the recipe's AdamW option (None: its default, the
    fused kernel; False: torch's default, as the loop has it)."""
    print(
        f"KD on digits, batch 64, {steps} steps: a 3-conv CNN teacher "
        f"({sum(p.numel() for p in cnn_teacher().parameters()):,} parameters) into a 2-layer "
        f"MLP ({sum(p.numel() for p in mlp_student().parameters()):,}); "
        f"{torch.get_num_threads()} threads, {rounds} rounds, interleaved step by step"
    )
    kernel = "per tensor, as the loop's" if fused is False else "fused (the recipe's default)"
    print(f"   the engine's AdamW: {kernel}; the loop's: torch's default (per tensor on a CPU)")
    clocks: list[tuple[Clock, Clock]] = []
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm-up"
        warm.mkdir()
        _interleaved(_plan(steps // 4, warm, fused), warm, steps // 4)  # kernels, allocator settle
        for round_ in range(rounds):
            folder = Path(tmp) / f"round{round_}"
            folder.mkdir()
            engine, loop, engine_student, loop_student = _interleaved(
                _plan(steps, folder, fused), folder, steps
            )
            clocks.append((engine, loop))
    mine = dict(engine_student.state_dict())
    theirs = loop_student.state_dict()
    apart = max(float((mine[k] - theirs[k]).abs().max()) for k in theirs)

    def median_ratio(field: str) -> float:
        return statistics.median(getattr(e, field) / getattr(h, field) for e, h in clocks)

    headline = median_ratio("wall")
    for i, label in ((1, "hand-written loop"), (0, "compress engine")):
        walls = [c[i].wall for c in clocks]
        rounds_text = ", ".join(f"{t:.2f}" for t in walls)
        print(f"   {label:<18} {statistics.median(walls):7.3f} s wall (rounds: {rounds_text})")
    print(f"   engine / loop      {headline:7.3f}x wall (median of the per-round ratios)")
    fastest = min(e.wall for e, _ in clocks) / min(h.wall for _, h in clocks)
    print(
        f"                      {fastest:7.3f}x fastest rounds, {median_ratio('cpu'):.3f}x CPU time"
    )
    print(f"   final weights: max abs difference {apart:.2e}")
    return headline
