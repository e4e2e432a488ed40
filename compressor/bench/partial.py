"""`python -m compressor.bench partial`: what DMAE's partial teacher execution saves, in
FLOPs and time: the teacher's forward whole, truncated after the deepest block a loss reads,
and truncated on the visible patches only, each captured and run through the real passes."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


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
