"""OFA-KD on heterogeneous pairs: scratch vs plain logit KD vs OFA-KD, 3 seeds each, with all
training images and with 300 labelled ones.

    python examples/digits-ofa/run.py [--seeds 0 1 2] [--out runs/digits-ofa] [--reuse]

Writes runs/digits-ofa/report.md and report.json: mean and spread of student eval accuracy
per arm, and for the OFA runs what the ONNX export holds (branches are stripped, so its
float tensors add up to the plain student's parameters) and its parity with PyTorch.
`--reuse` keeps finished runs, so an interrupted sweep picks up where it stopped.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import onnx

from compressor.registry import Registry
from compressor.sweep import ArmResult, arm_table, run_arms, write_summary

HERE = Path(__file__).resolve().parent
PAIRS = {
    "CNN teacher -> ViT student": HERE / "cnn-to-vit.yaml",
    "ViT teacher -> MLP student": HERE / "vit-to-mlp.yaml",
}
SETTINGS = {
    "all 1347 training images": [],
    "300 labelled training images": ["data.kwargs.train_limit=300"],
}
ARMS = {
    "scratch (labels only)": ["losses=[{name: ce}]", "passes=[]", "export=[]"],
    "plain logit KD": [
        "losses=[{name: ce}, {name: kd, temperature: 4.0}]",
        "passes=[]",
        "export=[]",
    ],
    "OFA-KD": [],  # the recipe as written
}


def export_check(onnx_path: str, student_parameters: int) -> dict[str, Any]:
    """The exporter renames folded weights, so totals are compared rather than names: the
    float tensors must add up to the plain student's parameters plus a few constants."""
    elements, branch = 0, []
    for init in onnx.load(onnx_path).graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            size = 1
            for dim in init.dims:
                size *= dim
            elements += size
            if "ofa" in init.name or "branch" in init.name:
                branch.append(init.name)
    return {
        "onnx_float_elements": elements,
        "student_parameters": student_parameters,
        "branch_tensors": branch,
    }


def verdict(results: dict[str, ArmResult]) -> tuple[str, bool]:
    mean = {arm: r.summary()["mean"] for arm, r in results.items()}
    ofa_vs_kd = (mean["OFA-KD"] - mean["plain logit KD"]) * 100
    kd_vs_scratch = (mean["plain logit KD"] - mean["scratch (labels only)"]) * 100
    holds = ofa_vs_kd > 0.005 and kd_vs_scratch > 0.005
    text = (
        f"OFA-KD - plain KD = {ofa_vs_kd:+.2f} points, plain KD - scratch = {kd_vs_scratch:+.2f} points: "
        f"OFA-KD > plain KD > scratch {'holds' if holds else 'does not hold'}."
    )
    return text, holds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/digits-ofa"))
    parser.add_argument("--reuse", action="store_true", help="keep finished runs found in --out")
    args = parser.parse_args()
    registry = Registry.load()
    sections: list[str] = []
    data: dict[str, Any] = {}
    for setting, extra in SETTINGS.items():
        sections += [f"## {setting}", ""]
        for pair, recipe in PAIRS.items():
            print(f"== {pair}, {setting}", flush=True)
            arms = {arm: [*overrides, *extra] for arm, overrides in ARMS.items()}
            folder = args.out / (recipe.stem + ("" if not extra else "-300-labels"))
            results = run_arms(recipe, arms, args.seeds, folder, registry, reuse=args.reuse)
            text, holds = verdict(results)
            exports = []
            for report in results["OFA-KD"].runs:
                check = export_check(
                    report["exports"][0]["path"], report["models"]["student"]["parameters"]
                )
                exports.append({"max_abs_diff": report["exports"][0]["max_abs_diff"], **check})
            teacher = results["OFA-KD"].runs[0]["models"]["teacher"]["quality"]["accuracy"]
            sections += [
                f"### {pair}",
                "",
                f"Teacher eval accuracy {teacher:.4f}. Student eval accuracy, seeds {args.seeds}:",
                "",
            ]
            sections += [*arm_table(results), "", text, ""]
            sections.append(
                "OFA-KD exports, per seed: "
                + "; ".join(
                    f"{e['onnx_float_elements']:,} float numbers in the ONNX file for a {e['student_parameters']:,}-parameter "
                    f"student, branch tensors {e['branch_tensors'] or 'none'}, max abs diff vs PyTorch {e['max_abs_diff']:.2e}"
                    for e in exports
                )
            )
            sections.append("")
            data[f"{pair}, {setting}"] = {
                "arms": {
                    arm: r.summary() | {"per_seed": r.metric("accuracy")}
                    for arm, r in results.items()
                },
                "verdict": text,
                "ordering_holds": holds,
                "exports": exports,
            }
    write_summary(args.out / "report", "OFA-KD on digits: heterogeneous pairs", sections, data)
    print((args.out / "report.md").read_text())


if __name__ == "__main__":
    main()
