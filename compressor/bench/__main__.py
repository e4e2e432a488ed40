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
import json
import os
import sys

from compressor.bench.losses import Case, bench_losses, measure
from compressor.bench.partial import bench_partial


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_measure":
        print(json.dumps(measure(Case(**json.loads(argv[1])), argv[2])))
        return 0
    if argv and argv[0] == "_measure_llm":
        from compressor.bench.llm import measure as measure_llm

        print(json.dumps(measure_llm(argv[1], int(argv[2]))))
        return 0
    if argv and argv[0] == "_dist_memory":
        from compressor.bench.distributed import memory_worker

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
        from compressor.bench.engine import bench_engine

        bench_engine(args.steps or 630, args.rounds, fused=False if args.unfused else None)
    elif args.suite == "distributed":
        from compressor.bench.distributed import bench_distributed

        bench_distributed(args.steps or 60)
    elif args.suite == "llm":
        from compressor.bench.llm import bench_llm

        bench_llm(args.reps or 3)
    else:
        bench_partial(args.model, args.block, args.ratio, args.batch, args.reps or 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
