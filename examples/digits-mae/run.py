"""DMAE on digits: masked feature distillation then fine-tuning, against fine-tuning alone.

    python examples/digits-mae/run.py [--seeds 0 1 2] [--out runs/digits-mae]

For each seed: distill.yaml (teacher truncated after blocks.3, 75% of patches masked), then
finetune.yaml from the distilled student; and finetune.yaml from scratch with the same seed
and steps. Writes runs/digits-mae/report.md and report.json. The teacher's cost with and
without partial execution: python -m compressor.bench partial.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from compressor.registry import Registry
from compressor.sweep import ArmResult, arm_table, run_one, write_summary

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/digits-mae"))
    args = parser.parse_args()
    registry = Registry.load()
    arms = {
        "fine-tuning alone": ArmResult("fine-tuning alone"),
        "DMAE distillation + fine-tuning": ArmResult("DMAE"),
    }
    for seed in args.seeds:
        distilled = args.out / "distill" / f"seed{seed}"
        run_one(HERE / "distill.yaml", [f"seed={seed}"], distilled, registry)
        weights = (distilled / "student.safetensors").resolve()
        for arm, extra in (
            ("fine-tuning alone", []),
            ("DMAE distillation + fine-tuning", [f"student.weights={weights}"]),
        ):
            report = run_one(
                HERE / "finetune.yaml",
                [f"seed={seed}", *extra],
                args.out / arm.split()[0].lower() / f"seed{seed}",
                registry,
            )
            arms[arm].runs.append(report)
            print(
                f"  {arm:<32} seed {seed}: accuracy {report['models']['student']['quality']['accuracy']:.4f}",
                flush=True,
            )
    gain = (
        arms["DMAE distillation + fine-tuning"].summary()["mean"]
        - arms["fine-tuning alone"].summary()["mean"]
    )
    sections = [
        f"Student eval accuracy after fine-tuning on 200 labelled images, seeds {args.seeds}:",
        "",
        *arm_table(arms),
        "",
        f"DMAE gain: {gain * 100:+.2f} accuracy points (mean).",
    ]
    data = {arm: r.summary() | {"per_seed": r.metric("accuracy")} for arm, r in arms.items()}
    write_summary(args.out / "report", "DMAE on digits", sections, data | {"gain": gain})
    print((args.out / "report.md").read_text())


if __name__ == "__main__":
    main()
