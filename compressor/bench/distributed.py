"""`python -m compressor.bench distributed`: one process against two, and DDP against FSDP.

- Throughput: the MiniLM example (real teacher, 32 texts a step) trained with `compress` in
  one process and under `compress --nproc 2` (torchrun, gloo), side by side: samples per
  second of the training phase (its evaluations included, the same in both).
- Memory: SmolLM2-135M as the teacher of its 15-layer student on two ranks, under DDP and
  under FSDP. Each rank reports the teacher's parameter bytes it holds, its resident set
  once the step is wrapped (what training keeps), and the high-water mark of one training
  step after that. Every rank loads the whole teacher before sharding it, so the process's
  lifetime peak is the same under both and is not what FSDP changes.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from compressor.bench.common import HONEST_MALLOC, reset_rss_peak, rss

ROOT = Path(__file__).resolve().parents[2]
MINILM = ROOT / "examples" / "minilm" / "recipe.yaml"
SMOLLM2 = ROOT / "examples" / "smollm2" / "recipe.yaml"
MEMORY_OVERRIDES = [
    "teacher_cache=null",
    "data.kwargs.source=prose",
    "data.kwargs.limit=60",
    "data.kwargs.eval_fraction=0.2",
    "data.kwargs.max_length=128",
    "data.batch_size=4",
    "train.steps=1",
]


def _throughput(nproc: int, steps: int, folder: Path) -> dict[str, Any]:
    out = folder / f"minilm-{nproc}"
    command = [sys.executable, "-m", "compressor", str(MINILM), f"output={out}"]
    command += [f"train.steps={steps}", f"train.eval_every={steps}", "export=[]", "--quiet"]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    report = json.loads((out / "report.json").read_text())
    seconds = float(report["train_seconds"])
    return {"seconds": seconds, "samples_per_s": steps * 32 / seconds}


def memory_worker(strategy: str) -> dict[str, Any]:
    """Under torchrun: build the SmolLM2 plan, wrap its step, take one training step."""
    import torch

    from compressor import distributed
    from compressor.distributed import Parallel
    from compressor.plan import build_plan
    from compressor.recipe_file import load_recipe
    from compressor.registry import Registry
    from compressor.step import backward

    world = distributed.join("cpu")
    registry = Registry.load()
    overrides = [*MEMORY_OVERRIDES, f"train.distributed.strategy={strategy}"]
    recipe = load_recipe(SMOLLM2, overrides, registry)
    plan = build_plan(recipe, registry)
    parallel = Parallel(plan, world, recipe.train.distributed)
    assert plan.teacher_graph is not None
    held = sum(
        distributed._local(p).numel() * p.element_size() for p in plan.teacher_graph.parameters()
    )
    gc.collect()
    wrapped = rss("VmRSS")
    reset_rss_peak()  # the high-water mark of the step alone
    indices = world.slice(torch.arange(recipe.data.batch_size))
    x, y = plan.data.batch("train", indices, plan.device)
    backward(list(parallel.terms(x, y, None, indices.tolist()).values()), plan.loss_seeds())
    row = {"teacher_bytes": held, "wrapped_rss": wrapped, "step_peak_rss": rss("VmHWM")}
    rows = world.gather(row)
    distributed.leave()
    return {"ranks": rows}


def _memory(strategy: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=2", "-m", "compressor.bench", "_dist_memory", strategy]
    env = {**os.environ, **HONEST_MALLOC, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return dict(json.loads(lines[-1]))


def bench_distributed(steps: int) -> None:
    print(f"data-parallel on {os.cpu_count()} CPU threads (gloo); samples/s of the training phase")
    with tempfile.TemporaryDirectory() as tmp:
        one, two = (_throughput(n, steps, Path(tmp)) for n in (1, 2))
    print(f"\nMiniLM example, {steps} steps of 32 texts:")
    for n, row in ((1, one), (2, two)):
        if "error" in row:
            print(f"  {n} process(es): failed: {row['error']}")
        else:
            print(
                f"  {n} process(es): {row['samples_per_s']:7.1f} samples/s ({row['seconds']:.1f} s)"
            )
    if "error" not in one and "error" not in two:
        print(f"  2 processes / 1: {two['samples_per_s'] / one['samples_per_s']:.2f}x")

    mib = 2**20
    print("\nSmolLM2-135M teacher, 2 ranks, per rank (max over ranks):")
    print(f"  {'strategy':<8} {'teacher held':>13} {'RSS wrapped':>12} {'RSS step peak':>14}")
    held = {}
    for strategy in ("ddp", "fsdp"):
        result = _memory(strategy)
        if "error" in result:
            print(f"  {strategy:<8} failed: {result['error']}")
            continue
        ranks = result["ranks"]
        held[strategy] = max(r["teacher_bytes"] for r in ranks)
        wrapped = max(r["wrapped_rss"] for r in ranks)
        peak = max(r["step_peak_rss"] for r in ranks)
        print(
            f"  {strategy:<8} {held[strategy] / mib:10.0f} MiB {wrapped / mib:8.0f} MiB "
            f"{peak / mib:10.0f} MiB"
        )
    if len(held) == 2:
        print(f"  FSDP teacher bytes per rank / DDP: {held['fsdp'] / held['ddp']:.2f}")
