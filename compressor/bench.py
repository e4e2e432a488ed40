"""Benchmarks, printed as ratios measured side by side in one run (never asserted in tests).

    python -m compressor.bench losses            all cases (GPU rows need an NVIDIA GPU)
    python -m compressor.bench losses --quick    smaller shapes, for a smoke run
    python -m compressor.bench partial           DMAE partial teacher execution: FLOPs, time
    python -m compressor.bench engine            the engine against a hand-written loop
    python -m compressor.bench engine --unfused  the same, both with torch's default AdamW
    python -m compressor.bench llm               SmolLM2 KD step: unfused, fused head, cached
    python -m compressor.bench distributed       1 against 2 processes; DDP against FSDP memory

Each (case, method) runs in its own subprocess so peak memory is its own: on CPU the peak
resident set after a warm-up (glibc told to return freed blocks at once, the high-water
mark reset through /proc/self/clear_refs); on CUDA torch.cuda.max_memory_allocated.
"Extra" memory excludes the inputs. Methods: eager PyTorch (the reference formula with
autograd), compiled PyTorch (torch.compile of it), and ours (impl: auto).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


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


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


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
        Path("/proc/self/clear_refs").write_text("5")  # reset the resident high-water mark
        base = _rss("VmRSS")
    times = []
    for _ in range(case.reps):
        sync()
        began = time.perf_counter()
        _step(case, method, x)
        sync()
        times.append(time.perf_counter() - began)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss("VmHWM")
    return {"seconds": statistics.median(times), "peak_extra_bytes": max(0, peak - base)}


def _run_one(case: Case, method: str) -> dict[str, Any]:
    """Time under the normal allocator; memory in a second process where glibc returns every
    freed block at once (that makes the resident set honest but adds page faults)."""
    timing = _subprocess(case, method, {})
    if "error" in timing or case.device == "cuda":
        return timing
    memory = _subprocess(
        Case(**{**case.__dict__, "reps": 1}),
        method,
        {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"},
    )
    if "error" in memory:
        return memory
    return {"seconds": timing["seconds"], "peak_extra_bytes": memory["peak_extra_bytes"]}


def _subprocess(case: Case, method: str, env: dict[str, str]) -> dict[str, Any]:
    return measure_in_subprocess(["_measure", json.dumps(case.__dict__), method], env)


def measure_in_subprocess(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """`python -m compressor.bench ARGS` in a fresh process: its last line of JSON, or
    {"error": its last line of stderr}."""
    result = subprocess.run(
        [sys.executable, "-m", "compressor.bench", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


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


def bench_partial(
    model: str, block: str, ratio: float, batch: int, reps: int
) -> dict[str, tuple[int, float]]:
    """Teacher forward cost: (a) whole, (b) truncated after `block`, (c) (b) on the visible
    tokens only. All three are symbolic_trace captures run through the real passes."""
    from torch.utils.flop_counter import FlopCounterMode

    from compressor.capture import capture_module
    from compressor.graph_pass import PassContext, draw_graph_inputs, run_passes
    from compressor.loading import import_file
    from compressor.registry import Registry

    file, _, function = model.rpartition(":")
    torch.manual_seed(0)
    teacher = getattr(import_file(Path(file)), function)().eval()
    x = torch.randn(batch, 1, 8, 8)
    registry = Registry.load()
    cases = {
        "(a) full teacher, all tokens": [],
        f"(b) truncated after {block}": ["tap", "truncate_teacher"],
        f"(c) truncated + {ratio:.0%} of patches masked": ["mae_mask", "tap", "truncate_teacher"],
    }
    print(
        f"teacher {model}: {sum(p.numel() for p in teacher.parameters()):,} parameters, batch {batch}, {torch.get_num_threads()} threads"
    )
    rows = {}
    for label, names in cases.items():
        gm = capture_module(teacher, (x,), "teacher", "symbolic_trace")
        passes = [
            registry.create("graph_pass", n, {"ratio": ratio} if n == "mae_mask" else {})
            for n in names
        ]
        gm = run_passes(
            gm, passes, PassContext("teacher", [block] if names else [], output_needed=not names)
        )
        extra = draw_graph_inputs([gm], batch, x.device)
        with torch.no_grad():
            counter = FlopCounterMode(display=False)
            with counter:
                gm(x, **extra)
            for _ in range(3):
                gm(x, **extra)
            times = []
            for _ in range(reps):
                began = time.perf_counter()
                gm(x, **extra)
                times.append(time.perf_counter() - began)
        rows[label] = (counter.get_total_flops(), statistics.median(times))
    full_flops, full_time = next(iter(rows.values()))
    for label, (flops, seconds) in rows.items():
        print(
            f"   {label:<42} {flops / 1e9:8.3f} GFLOP ({flops / full_flops:6.1%})"
            f"   {seconds * 1e3:8.2f} ms ({seconds / full_time:6.1%})"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_measure":
        print(json.dumps(measure(Case(**json.loads(argv[1])), argv[2])))
        return 0
    if argv and argv[0] == "_measure_llm":
        from compressor.bench_llm import measure as measure_llm

        print(json.dumps(measure_llm(argv[1], int(argv[2]))))
        return 0
    if argv and argv[0] == "_dist_memory":
        from compressor.bench_distributed import memory_worker

        result = memory_worker(argv[1])
        if result["ranks"] is not None and os.environ.get("RANK", "0") == "0":
            print(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m compressor.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("suite", choices=["losses", "partial", "engine", "llm", "distributed"])
    parser.add_argument("--quick", action="store_true", help="losses: small shapes, a smoke run")
    parser.add_argument(
        "--model",
        default="examples/digits/models.py:vit_teacher",
        help="partial: FILE:FUNCTION building the ViT teacher",
    )
    parser.add_argument(
        "--block", default="blocks.3", help="partial: the deepest block a loss reads"
    )
    parser.add_argument(
        "--ratio", type=float, default=0.75, help="partial: fraction of patches masked"
    )
    parser.add_argument("--batch", type=int, default=1024, help="partial: images per forward")
    parser.add_argument(
        "--reps", type=int, default=None, help="partial: timed forwards (20); llm: steps (3)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="engine: training steps (630); distributed (60)"
    )
    parser.add_argument("--rounds", type=int, default=11, help="engine: interleaved rounds")
    parser.add_argument(
        "--unfused",
        action="store_true",
        help="engine: the recipe's AdamW per tensor (fused: false), as the loop's",
    )
    args = parser.parse_args(argv)
    if args.suite == "losses":
        bench_losses(args.quick)
    elif args.suite == "engine":
        from compressor.bench_engine import bench_engine

        bench_engine(args.steps or 630, args.rounds, fused=False if args.unfused else None)
    elif args.suite == "distributed":
        from compressor.bench_distributed import bench_distributed

        bench_distributed(args.steps or 60)
    elif args.suite == "llm":
        from compressor.bench_llm import bench_llm

        bench_llm(args.reps or 3)
    else:
        bench_partial(args.model, args.block, args.ratio, args.batch, args.reps or 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
