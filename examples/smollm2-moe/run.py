"""A dense student against an MoE student with the same active parameters per token.

    python examples/smollm2-moe/run.py [--out runs/smollm2-moe] [--steps 150 30]

Both arms distil SmolLM2-135M-Instruct with recipe.yaml's two stages (mimic on the
standard library's prose, then DPO against the teacher on prose pairs), same data and steps:
- moe: 8 teacher layers, the odd ones' FFNs upcycled into 4 experts, 2 per token (recipe.yaml);
- dense: 11 teacher layers, no experts (as many active parameters per token).
Writes <out>/report.md and report.json: parameters in all and active, the mimic stage's
perplexity, KL(teacher || student) and top-1 agreement on held-out prose, preference accuracy
after the preference stage against the teacher's, expert load, ONNX latency and generation
tokens/s. Whichever arm wins, the table says so. An arm whose run finished is reused.
Measured on 2 CPU cores: about 30 minutes for the MoE arm and 25 for the dense one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from compressor.registry import Registry
from compressor.sweep import run_one, write_summary

HERE = Path(__file__).resolve().parent
ARMS = {
    "moe (8 layers, 4 with 4 experts, top 2)": [],
    "dense (11 layers)": [  # no experts, so no load-balancing loss
        "module_passes=[{name: student_layers, keep: 11, select: auto, calibration_batches: 2}]",
        "losses=[{name: kd, temperature: 1.0, t2_scale: false, fused_head: true}]",
        "stages.1.losses=[{name: dpo, beta: 0.1}]",
    ],
}


def _row(arm: str, report: dict[str, Any]) -> dict[str, Any]:
    student = report["models"]["student"]
    mimic = report["stages"][0]["final_eval"]
    return {
        "arm": arm,
        "parameters": student["parameters"],
        "active": student.get("active_parameters", student["parameters"]),
        "perplexity": mimic.get("perplexity"),
        "kl": mimic.get("kl_to_teacher"),
        "top1": mimic.get("top1_agreement"),
        "preference": student["quality"].get("preference_accuracy"),
        "teacher_preference": student["quality"].get("teacher_preference_accuracy"),
        "onnx_ms": student["latency_ms"].get("hf", {}).get("1"),
        "tokens_per_s": student.get("generation_tokens_per_s", {}).get("hf"),
        "load_max": report.get("observed", {}).get("moe_balance/load_max"),
        "train_minutes": report["train_seconds"] / 60,
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/smollm2-moe"))
    parser.add_argument("--steps", type=int, nargs=2, default=[150, 30], metavar=("MIMIC", "PREF"))
    args = parser.parse_args()
    registry = Registry.load()
    steps = [f"stages.0.steps={args.steps[0]}", f"stages.1.steps={args.steps[1]}"]
    rows = []
    for arm, overrides in ARMS.items():
        folder = args.out / arm.split()[0]
        finished = folder / "report.json"  # an arm that finished is reused
        report = (
            json.loads(finished.read_text())
            if finished.is_file()
            else run_one(HERE / "recipe.yaml", [*overrides, *steps], folder, registry, True)
        )
        rows.append(_row(arm, report))
        print(json.dumps(rows[-1]), flush=True)
    keys = list(rows[0])[1:]
    table = ["| arm | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    table += ["| " + " | ".join([r["arm"], *(_fmt(r[k]) for k in keys)]) + " |" for r in rows]
    moe, dense = rows
    if moe["kl"] is None or dense["kl"] is None:
        verdict = "KL after mimic was not measured for both arms"
    else:
        closer = "MoE" if moe["kl"] < dense["kl"] else "dense"
        verdict = (
            f"The {closer} student is closer to the teacher after mimic: KL {moe['kl']:.4g} "
            f"(moe) against {dense['kl']:.4g} (dense)"
        )
    sections = [
        f"Teacher SmolLM2-135M-Instruct; {args.steps[0]} mimic steps of 4 x 256 tokens, then "
        f"{args.steps[1]} DPO steps of 8 pairs, the same for both arms. perplexity, kl and top1 "
        "are on held-out prose after the mimic stage; preference after the preference stage. "
        "load_max: the largest share of routed slots one expert takes in any MoE layer "
        "(0.25 is even; 0.5, one over top_k, means it is chosen for every token); onnx_ms: "
        "onnxruntime at batch 1; tokens_per_s: greedy generation with the KV cache.",
        "",
        *table,
        "",
        f"{verdict}.",
    ]
    write_summary(
        args.out / "report.md", "SmolLM2-135M: dense against MoE student", sections, {"arms": rows}
    )


if __name__ == "__main__":
    main()
