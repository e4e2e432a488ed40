"""Deployment: int8 ONNX checked by the task metric, the report's deployment table, and
`compress bench`."""

from __future__ import annotations

import json

import pytest
from conftest import FAST_RECIPE, TINY

from compressor.cli import main
from compressor.export import ExportResult

INT8 = FAST_RECIPE + "export:\n  - name: onnx\n  - name: onnx_int8\n"


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    """A finished run exporting fp32 and int8 ONNX of teacher and student."""
    folder = tmp_path_factory.mktemp("int8")
    recipe = folder / "recipe.yaml"
    recipe.write_text(INT8 + f"output: {folder / 'run'}\n")
    # a teacher wide enough that int8 weights outweigh the file's fixed parts
    assert main([str(recipe), "--quiet", "teacher.kwargs.width=128"]) == 0
    return folder / "run"


def test_int8_export_is_verified_by_the_task_metric(int8_run):
    report = json.loads((int8_run / "report.json").read_text())
    entry = next(e for e in report["exports"] if e["label"] == "onnx_int8")
    assert entry["ok"] and entry["mode"] == "static" and entry["metric"] == "accuracy"
    assert entry["drop"] == pytest.approx(entry["fp32"]["accuracy"] - entry["int8"]["accuracy"])
    assert entry["drop"] <= entry["max_drop"] == 0.005
    # the fp32 score is the PyTorch student's own
    assert entry["fp32"]["accuracy"] == report["models"]["student"]["quality"]["accuracy"]
    files = report["models"]["teacher"]["files"]
    assert files["onnx_int8"]["bytes"] < files["onnx"]["bytes"] / 2  # int8 weights
    for role in ("teacher", "student"):
        assert all(v > 0 for v in report["models"][role]["latency_ms"]["onnx_int8"].values())
    # each int8 file carries its own scores (the teacher's too), the fp32 files none
    assert report["models"]["student"]["files"]["onnx_int8"]["quality"] == entry["int8"]
    assert 0 < files["onnx_int8"]["quality"]["accuracy"] <= 1
    assert "quality" not in files["onnx"]


def test_the_report_has_a_deployment_table(int8_run):
    markdown = (int8_run / "report.md").read_text()
    table = markdown.split("## Deployment")[1].split("##")[0]
    assert (
        "| artifact | file | accuracy | p50 ms @ 1 | p50 ms @ 32 | vs teacher onnx @ 1 |" in table
    )
    for row in ("teacher onnx |", "teacher onnx_int8 |", "student onnx |", "student onnx_int8 |"):
        assert f"| {row}" in table
    teacher_row = next(line for line in table.splitlines() if line.startswith("| teacher onnx |"))
    assert teacher_row.endswith("| 1.00x | 1.00x |")  # the reference against itself


def test_speedups_are_over_the_teachers_fp32_folder_when_it_has_no_plain_onnx():
    from compressor.plugins.report import _deployment_lines

    def model(hf: float, int8: float, score: float, int8_score: float) -> dict:
        files = {label: {"path": label, "bytes": 1024} for label in ("hf", "hf_int8")}
        files["hf_int8"]["quality"] = {"spearman": int8_score}  # lossy: scored on its own
        latency = {"hf": {"32": hf}, "hf_int8": {"32": int8}, "pytorch": {"32": 1.0}}
        return {"files": files, "latency_ms": latency, "quality": {"spearman": score}}

    report = {
        "metric": "spearman",
        "models": {
            "teacher": model(600.0, 300.0, 1.0, 0.995),
            "student": model(200.0, 120.0, 0.9, 0.898),
        },
        "exports": [],
    }
    lines = _deployment_lines(report)
    assert "| artifact | file | spearman | p50 ms @ 32 | vs teacher hf @ 32 |" in lines
    assert "| teacher hf_int8 | 1.0 KiB | 0.995 | 300 | 2.00x |" in lines
    assert "| student hf_int8 | 1.0 KiB | 0.898 | 120 | 5.00x |" in lines
    assert "| student hf | 1.0 KiB | 0.9 | 200 | 3.00x |" in lines


def test_an_int8_artifact_that_loses_too_much_fails_with_the_drop(write_recipe, tmp_path, capsys):
    # logits offset by 1000: uint8 activations must span 0..1000, so a quantization step of
    # about 4 erases the differences between classes, whatever the calibration
    models = tmp_path / "offset.py"
    models.write_text(
        f"import sys\nsys.path.insert(0, {str(TINY.parent)!r})\n"
        "from tiny_models import MLP\n\n\n"
        "class Offset(MLP):\n"
        "    def forward(self, x):\n"
        "        return super().forward(x) + 1000.0\n"
    )
    recipe = INT8.replace(
        f"{TINY}:mlp\n  kwargs: {{width: 8", f"{models}:Offset\n  kwargs: {{width: 8"
    ).replace("  - name: feature_mse\n    student: layers.1\n    teacher: layers.2\n", "")
    assert main([str(write_recipe(recipe)), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "onnx_int8 export" in err and "accuracy against the fp32 model (max_drop 0.005)" in err
    entry = next(
        e
        for e in json.loads((tmp_path / "run" / "report.json").read_text())["exports"]
        if e["label"] == "onnx_int8"
    )
    assert not entry["ok"] and entry["drop"] > 0.005


def test_export_result_checks():
    plain = ExportResult("onnx", TINY, 1e-5, 1e-4)
    assert plain.ok and "differs from PyTorch" in plain.failure()
    lossy = ExportResult(
        "onnx_int8", TINY, 0.3, float("inf"), {"metric": "accuracy"}, "q", 0.02, 0.01
    )
    assert not lossy.ok
    assert (
        lossy.failure()
        == f"q export {TINY} loses 0.02 accuracy against the fp32 model (max_drop 0.01)"
    )


def test_bench_times_every_artifact_in_interleaved_rounds(int8_run, capsys):
    args = ["bench", str(int8_run), "--rounds", "2", "--iterations", "3", "--batch-sizes", "1,4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| model | artifact | backend | batch | p50 ms |" in out
    bench = json.loads((int8_run / "bench" / "bench.json").read_text())
    found = {(r["model"], r["artifact"], r["backend"]) for r in bench["rows"]}
    for role in ("teacher", "student"):
        assert (role, "pytorch", "pytorch-cpu") in found
        assert (role, "onnx", "onnxruntime-cpu") in found
        assert (role, "onnx_int8", "onnxruntime-cpu") in found
    for row in bench["rows"]:
        assert row["calls"] == 6 and row["batch"] in (1, 4)
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    assert any("tensorrt" in line for line in bench["not_measured"])
    assert (int8_run / "bench" / "bench.png").stat().st_size > 0


def test_bench_names_what_is_wrong(tmp_path, capsys):
    assert main(["bench", str(tmp_path)]) == 1
    assert "holds no finished run (no report.json)" in capsys.readouterr().err
    (tmp_path / "report.json").write_text(json.dumps({"recipe": str(tmp_path / "gone.yaml")}))
    (tmp_path / "recipe.yaml").write_text("name: x\n")
    assert main(["bench", str(tmp_path)]) == 1
    assert "gone.yaml, which is not found from here" in capsys.readouterr().err
