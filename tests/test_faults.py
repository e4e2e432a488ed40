"""Fault injection: real `compress` processes killed, starved of disk or raced, and what the
run folder holds afterwards. The cases are listed in docs/runs.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST_RECIPE, TESTS, run_compress
from safetensors.torch import load_file

from compressor.checkpoint import latest_checkpoint
from compressor.cli import main
from compressor.metrics import read_metrics

# log every step, so a kill can land on any of them; checkpoints at 10, 20, 30
RECIPE = FAST_RECIPE.replace("log_every: 5", "log_every: 1")
KILLED = -9


def _compress(
    recipe: Path, output: Path, *args: str, fault: str = ""
) -> subprocess.CompletedProcess[str]:
    return run_compress(
        *("-p", "fault_injection", str(recipe), f"output={output}", "--quiet", *args),
        path=(TESTS,),
        env={"COMPRESSOR_FAULT": fault},
    )


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "recipe.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def uninterrupted(recipe: Path) -> list[tuple[int, float]]:
    """The loss curve of the same recipe run without faults."""
    run = recipe.parent / "uninterrupted"
    done = _compress(recipe, run)
    assert done.returncode == 0, done.stderr[-3000:]
    return _losses(run)


def _assert_finished(run: Path, expected: list[tuple[int, float]]) -> None:
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 30 and all(e["ok"] for e in report["exports"])
    got = _losses(run)
    assert [s for s, _ in got] == [s for s, _ in expected]
    for (_, a), (_, b) in zip(expected, got, strict=True):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-7)
    assert not (run / ".lock").exists()


def test_killed_at_several_steps_resumes_on_the_uninterrupted_curve(
    recipe, uninterrupted, tmp_path
):
    run = tmp_path / "run"
    assert _compress(recipe, run, fault="kill_at_step:7").returncode == KILLED
    assert latest_checkpoint(run / "checkpoints") is None  # killed before the first checkpoint
    # nothing to resume yet: a plain rerun writes over what the killed run left
    assert _compress(recipe, run, fault="kill_at_step:23").returncode == KILLED
    assert latest_checkpoint(run / "checkpoints").step == 20
    stale = json.loads((run / ".lock").read_text())  # the killed run's name is still there
    assert stale["pid"] > 0 and stale["host"]
    resumed = _compress(recipe, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"took over the lock of run pid {stale['pid']}" in resumed.stderr
    _assert_finished(run, uninterrupted)


def test_killed_inside_a_checkpoint_write_keeps_the_previous_checkpoint(
    recipe, uninterrupted, tmp_path
):
    run = tmp_path / "run"
    assert _compress(recipe, run, fault="kill_in_checkpoint:20").returncode == KILLED
    checkpoint = latest_checkpoint(run / "checkpoints")
    assert checkpoint is not None and checkpoint.step == 10
    assert (run / "checkpoints" / ".tmp-step_0000020" / "student.safetensors").is_file()
    weights = load_file(checkpoint.path / "student.safetensors")  # readable, complete
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    assert torch.load(checkpoint.path / "state.pt", weights_only=True)["step"] == 10
    resumed = _compress(recipe, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (run / "checkpoints" / ".tmp-step_0000020").exists()
    _assert_finished(run, uninterrupted)


@pytest.mark.parametrize("fault", ["kill_in_export", "kill_in_report"])
def test_killed_in_export_or_report_resume_redoes_only_those(
    recipe, uninterrupted, tmp_path, fault
):
    run = tmp_path / "run"
    assert _compress(recipe, run, fault=fault).returncode == KILLED
    metrics = (run / "metrics.jsonl").read_bytes()
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    weights = (run / "checkpoints" / "step_0000030" / "student.safetensors").stat().st_mtime_ns
    resumed = _compress(recipe, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "metrics.jsonl").read_bytes() == metrics  # no step was trained again
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints
    assert (
        run / "checkpoints" / "step_0000030" / "student.safetensors"
    ).stat().st_mtime_ns == weights
    _assert_finished(run, uninterrupted)


def test_two_runs_started_together_exactly_one_runs(recipe, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "COMPRESSOR_FAULT": ""}
    command = [sys.executable, "-m", "compressor", str(recipe), f"output={run}", "--quiet"]
    first = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    errors = [p.communicate(timeout=600)[1] for p in (first, second)]
    codes = sorted([first.returncode, second.returncode])
    assert codes == [0, 1], errors
    refused = errors[[first.returncode, second.returncode].index(1)]
    # refused while the other runs (named once it has written its name, "starting up" in the
    # instant before), or after it finished (the folder holds a run)
    expected = (
        "is in use by run pid",
        "is in use by another run, starting up",
        "already holds a run",
    )
    assert any(text in refused for text in expected), refused
    assert json.loads((run / "report.json").read_text())["steps"] == 30


def test_a_write_that_fails_part_way_keeps_the_last_checkpoint_and_says_why(
    recipe, uninterrupted, tmp_path
):
    run = tmp_path / "run"
    failed = _compress(recipe, run, fault="fsize_in_checkpoint:20")
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "writing the checkpoint of step 20" in failed.stderr
    assert "File too large" in failed.stderr
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step_0000010'}" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert latest_checkpoint(run / "checkpoints").step == 10
    assert not (run / "checkpoints" / ".tmp-step_0000020").exists()
    resumed = _compress(recipe, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_finished(run, uninterrupted)


# -- the folder is the run's alone (in-process: no fault needed) --------------------------------
@pytest.mark.parametrize("mine", ["notes.txt", "recipe.yaml"])  # a name a run writes, too
def test_overwrite_keeps_files_no_run_wrote(write_recipe, tmp_path, capsys, mine):
    path = write_recipe(RECIPE.replace("steps: 30", "steps: 5"))
    run = tmp_path / "run"
    run.mkdir()
    (run / mine).write_text("mine")
    for args in ([], ["--overwrite"]):
        assert main([str(path), "--quiet", *args]) == 1
        err = capsys.readouterr().err
        assert f"holds files no run wrote ({mine})" in err and "output=NEW_FOLDER" in err
    assert sorted(p.name for p in run.iterdir()) == [mine]
    assert (run / mine).read_text() == "mine"


def test_overwrite_removes_what_the_run_wrote_and_refuses_what_was_added_later(
    write_recipe, tmp_path, capsys
):
    path = write_recipe(RECIPE.replace("steps: 30", "steps: 5"))
    run = tmp_path / "run"
    assert main([str(path), "--quiet"]) == 0
    owned = json.loads((run / ".owned.json").read_text())["entries"]
    assert {"report.json", "report.md", "checkpoints", "export", "recipe.yaml"} <= set(owned)
    (run / "old.txt").write_text("later")
    assert main([str(path), "--quiet", "--overwrite"]) == 1
    assert "old.txt" in capsys.readouterr().err and (run / "report.json").is_file()
    (run / "old.txt").unlink()
    (run / "report.md").write_text("stale")
    assert main([str(path), "--quiet", "--overwrite"]) == 0
    assert (run / "report.md").read_text() != "stale"
