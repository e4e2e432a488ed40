from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
from conftest import FAST_RECIPE

from compressor.cli import main


def test_run_end_to_end_writes_report_export_and_baseline(write_recipe, tmp_path, capsys):
    path = write_recipe()
    assert main([str(path), "report.baseline=true", "--quiet"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    assert f"run folder: {run}" in out and "distillation gain" in out
    for name in (
        "report.json",
        "report.md",
        "curves.png",
        "metrics.jsonl",
        "student.safetensors",
        "recipe.yaml",
    ):
        assert (run / name).is_file(), name
    assert (
        "# command-line overrides:\n#   report.baseline=true" in (run / "recipe.yaml").read_text()
    )
    report = json.loads((run / "report.json").read_text())
    models = report["models"]
    assert set(models) == {"teacher", "student", "baseline"}
    assert models["teacher"]["parameters"] > models["student"]["parameters"]
    for role in ("teacher", "student"):
        latency = models[role]["latency_ms"]
        assert set(latency) == {"pytorch", "onnx"} and set(latency["onnx"]) == {"1", "32"}
        assert all(v > 0 for v in latency["onnx"].values())
        assert models[role]["files"]["onnx"]["bytes"] > 0
    assert 0 <= models["student"]["quality"]["accuracy"] <= 1
    assert report["distillation_gain"]["accuracy"] == pytest.approx(
        models["student"]["quality"]["accuracy"] - models["baseline"]["quality"]["accuracy"]
    )
    export = report["exports"][0]
    assert export["ok"] and export["max_abs_diff"] < 1e-4 and export["verified_batches"] == [64, 1]
    model = onnx.load(export["path"])
    assert [o.name for o in model.graph.output] == ["logits"]  # no tap outputs survive strip
    markdown = (run / "report.md").read_text()
    assert "student without teacher (baseline)" in markdown and "verified" in markdown
    assert main([str(path), "--quiet"]) == 1  # the folder holds a run: refuse to clobber it
    assert "--overwrite" in capsys.readouterr().err


def test_a_run_that_does_not_export_the_teacher_writes_and_times_the_student_only(
    write_recipe, tmp_path, capsys
):
    path = write_recipe()
    assert main([str(path), "report.export_teacher=false", "train.steps=5", "--quiet"]) == 0
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    assert [e["ok"] for e in report["exports"]] == [True]
    assert sorted(p.name for p in (run / "export").iterdir()) == ["student.onnx"]
    assert "onnx" not in report["models"]["teacher"].get("files", {})
    assert "onnx" not in report["models"]["teacher"]["latency_ms"]
    assert "onnx" in report["models"]["student"]["latency_ms"]
    assert "| student onnx |" in (run / "report.md").read_text()


def test_export_above_tolerance_fails_with_the_number(write_recipe, tmp_path, capsys):
    path = write_recipe(FAST_RECIPE + "export:\n  - name: onnx\n    tolerance: 1.0e-30\n")
    assert main([str(path), "--quiet", "train.steps=5"]) == 1
    err = capsys.readouterr().err
    assert "onnx export" in err and "differs from PyTorch by" in err and "(tolerance 1e-30)" in err
    assert (tmp_path / "run" / "report.json").is_file()  # the numbers are kept for inspection


def test_validate_prints_taps_with_shapes(write_recipe, capsys):
    assert main(["validate", str(write_recipe())]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "256 train / 450 eval samples" in out
    assert (
        "loss feature_mse (weight 1.0): student.layers.1 -> node relu_1 [N, 8]; teacher.layers.2 -> node relu_2 [N, 32]"
        in out
    )


def test_graph_prints_and_writes_both_graphs(write_recipe, tmp_path, capsys):
    target = tmp_path / "graphs.txt"
    assert main(["graph", str(write_recipe()), "-o", str(target)]) == 0
    text = target.read_text()
    assert text.strip() == capsys.readouterr().out.strip()
    assert "== teacher graph" in text and "== student graph" in text
    assert "<- tap 'layers.2'" in text and "<- tap 'layers.1'" in text
    teacher = text.split("== student graph")[0]
    assert "layers.3" in teacher and "head" in teacher  # kd reads the logits: nothing is cut
    # a weight's shape is its size (the student's head: 8 -> 10 classes); a value's batch is N
    student = text.split("== student graph")[1].splitlines()[2:]
    rows = {line.split()[0]: line.split() for line in student if line.strip()}
    assert rows["head_bias"][-1] == "[10]" and rows["head_weight"][-2:] == ["[10,", "8]"]
    assert rows["linear_2"][-2:] == ["[N,", "10]"]


def test_graph_of_a_feature_only_recipe_shows_the_truncated_teacher(write_recipe, capsys):
    text = FAST_RECIPE.replace("  - name: kd\n    weight: 0.5\n    temperature: 2.0\n", "")
    assert main(["graph", str(write_recipe(text))]) == 0
    teacher = capsys.readouterr().out.split("== student graph")[0]
    assert "layers.2" in teacher and "layers.3" not in teacher and "head" not in teacher


def test_help_shows_examples_and_module_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "compressor", "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0 and "compress examples/digits/recipe.yaml" in result.stdout
    assert "validate" in result.stdout and "plugins" in result.stdout


def test_symbolic_trace_capture_method_runs_too(write_recipe, tmp_path, capsys):
    path = write_recipe()
    assert main([str(path), "--quiet", "capture.method=symbolic_trace", "train.steps=5"]) == 0
    assert json.loads((tmp_path / "run" / "report.json").read_text())["exports"][0]["ok"]


def test_student_with_batchnorm_and_dropout_exports_in_eval_form(write_recipe, tmp_path, capsys):
    text = FAST_RECIPE.replace(
        "{width: 8, depth: 2}", "{width: 8, depth: 2, dropout: 0.5, norm: true}"
    )
    assert main([str(write_recipe(text)), "--quiet", "train.steps=10"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["exports"][0]["max_abs_diff"] < 1e-4  # dropout off, running statistics used
    ops = {node.op_type for node in onnx.load(report["exports"][0]["path"]).graph.node}
    assert "Dropout" not in ops


def test_a_plugin_module_that_fails_to_import_is_named_with_its_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_plugin.py").write_text("import os\n\nraise RuntimeError('not ready')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["-p", "broken_plugin", "plugins"]) == 1
    err = capsys.readouterr().err
    assert "-p broken_plugin: the module was found but importing it failed" in err
    assert f"RuntimeError: not ready (at {tmp_path / 'broken_plugin.py'}:3)" in err
    assert "Traceback" not in err and "--traceback" in err

    assert main(["-p", "broken_plugin", "plugins", "--traceback"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "raise RuntimeError('not ready')" in err
    assert err.rstrip().splitlines()[-1].startswith("  --traceback shows")

    assert main(["-p", "no_such_plugin_module", "plugins"]) == 1  # unchanged: not there at all
    assert "no plugin entry point or importable module" in capsys.readouterr().err
