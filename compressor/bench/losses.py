"""`python -m compressor.bench losses`: the fused distillation losses of compressor.cuda
against eager and compiled PyTorch, forward + backward: median time and peak memory.

Each (case, method) runs in its own subprocess (`python -m compressor.bench _measure`) so
its peak memory is its own: on CPU the peak resident set after a warm-up, measured again in
a process whose allocator returns freed blocks at once; on CUDA max_memory_allocated.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from compressor.bench.common import HONEST_MALLOC, measure_in_subprocess, reset_rss_peak, rss


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # "logits" or "linear"
    device: str
    dtype: str
    n: int
    vocab: int
    hidden: int = 0
    reps: int = 5


CASES = [
    Case("logits KD fp32 CPU", "logits", "cpu", "float32", 4096, 32000),
    Case(
        "fused linear KD fp32 CPU (SmolLM2 shapes)",
        "linear",
        "cpu",
        "float32",
        8192,
        49152,
        576,
        reps=2,
    ),
    Case("logits KD bf16 GPU", "logits", "cuda", "bfloat16", 8192, 128256),
    Case(
        "fused linear KD bf16 GPU (SmolLM2 shapes)", "linear", "cuda", "bfloat16", 8192, 49152, 576
    ),
]
QUICK = {"logits": dict(n=512, vocab=8000), "linear": dict(n=1024, vocab=8192, hidden=128)}
METHODS = ("eager", "compiled", "ours")


def _inputs(case: Case) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dtype, device = getattr(torch, case.dtype), torch.device(case.device)
    if case.op == "logits":
        return {
            "s": (2 * torch.randn(case.n, case.vocab, generator=g))
            .to(device, dtype)
            .requires_grad_(True),
            "t": (2 * torch.randn(case.n, case.vocab, generator=g)).to(device, dtype),
        }
    scale = case.hidden**-0.5
    return {
        "hs": torch.randn(case.n, case.hidden, generator=g).to(device, dtype).requires_grad_(True),
        "ws": (scale * torch.randn(case.vocab, case.hidden, generator=g))
        .to(device, dtype)
        .requires_grad_(True),
        "ht": torch.randn(case.n, case.hidden, generator=g).to(device, dtype),
        "wt": (scale * torch.randn(case.vocab, case.hidden, generator=g)).to(device, dtype),
    }


def _step(case: Case, method: str, x: dict[str, torch.Tensor]) -> None:
    from compressor.cuda import kernels, reference

    impl = {"eager": "reference", "compiled": "compiled", "ours": "auto"}[method]
    if case.op == "logits":
        loss = kernels.divergence(x["s"], x["t"], temperature=2.0, impl=impl)
    else:
        loss = kernels.linear_divergence(
            x["hs"], x["ws"], x["ht"], x["wt"], temperature=2.0, impl=impl
        )
    assert reference is not None
    loss.backward()
    for tensor in x.values():
        tensor.grad = None


def measure(case: Case, method: str) -> dict[str, Any]:
    """Run in a fresh process: seconds per forward+backward (median over reps) and peak extra
    bytes over the same reps."""
    cuda = case.device == "cuda"
    x = _inputs(case)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    _step(case, method, x)  # warm-up: compilation, allocator
    gc.collect()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_rss_peak()
        base = rss("VmRSS")
    times = []
    for _ in range(case.reps):
        sync()
        began = time.perf_counter()
        _step(case, method, x)
        sync()
        times.append(time.perf_counter() - began)
    peak = torch.cuda.max_memory_allocated() if cuda else rss("VmHWM")
    return {"seconds": statistics.median(times), "peak_extra_bytes": max(0, peak - base)}


def _run_one(case: Case, method: str) -> dict[str, Any]:
    """Time under the normal allocator; memory in a second process where glibc returns every
    freed block at once (that makes the resident set honest but adds page faults)."""
    timing = _subprocess(case, method, {})
    if "error" in timing or case.device == "cuda":
        return timing
    memory = _subprocess(Case(**{**case.__dict__, "reps": 1}), method, HONEST_MALLOC)
    if "error" in memory:
        return memory
    return {"seconds": timing["seconds"], "peak_extra_bytes": memory["peak_extra_bytes"]}


def _subprocess(case: Case, method: str, env: dict[str, str]) -> dict[str, Any]:
    return measure_in_subprocess(["_measure", json.dumps(case.__dict__), method], env)


def _peak_bandwidth() -> float | None:
    props = torch.cuda.get_device_properties(0)
    clock, width = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock * 1e3 * width / 8 if clock and width else None  # double data rate, bytes/s


def bench_losses(quick: bool) -> None:
    print(
        "fused distillation losses: forward + backward, median time; peak extra memory beyond inputs"
    )
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPU threads, CUDA {'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}\n"
    )
    for case in CASES:
        if quick:
            case = Case(
                **{**case.__dict__, **QUICK[case.op], "name": case.name + " (quick shapes)"}
            )
        shape = f"N={case.n}, V={case.vocab}" + (f", H={case.hidden}" if case.hidden else "")
        print(f"== {case.name}: {shape} ==")
        if case.device == "cuda" and not torch.cuda.is_available():
            print("   unmeasured: no CUDA device on this machine\n")
            continue
        rows = {method: _run_one(case, method) for method in METHODS}
        eager = rows["eager"]
        nv4 = case.n * case.vocab * 4
        for method, row in rows.items():
            if "error" in row:
                print(f"   {method:<9} failed: {row['error']}")
                continue
            line = f"   {method:<9} {row['seconds'] * 1e3:9.1f} ms  peak extra {row['peak_extra_bytes'] / 2**20:9.1f} MiB"
            if "error" not in eager:
                line += f"  | speed x{eager['seconds'] / row['seconds']:.2f} vs eager"
                line += f", memory {row['peak_extra_bytes'] / max(eager['peak_extra_bytes'], 1) * 100:.1f}% of eager"
            if case.op == "logits":
                line += f", {row['peak_extra_bytes'] / nv4:.2f} x N*V*4"
            if case.device == "cuda" and case.op == "logits" and (peak := _peak_bandwidth()):
                elem = torch.tensor([], dtype=getattr(torch, case.dtype)).element_size()
                traffic = (
                    case.n * case.vocab * (2 * (elem + elem) + elem)
                )  # forward KL: 2 passes + grad
                line += f", {traffic / row['seconds'] / peak * 100:.0f}% of peak bandwidth"
            print(line)
        print()
