"""What a careless or unlucky recipe gets: a located error before anything runs, a stop with
the step when training blows up, and a warning when the student learned nothing."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FAST_RECIPE, TINY

from compressor.cli import main
from compressor.engine import Divergence
from compressor.metrics import read_metrics
from compressor.plugins.evaluators import Classification
from compressor.recipe import DivergenceGuard

HUGE_LR = FAST_RECIPE.replace("lr: 0.01", "lr: 1000.0")


def test_a_diverging_loss_stops_with_the_step_and_nothing_is_exported(
    write_recipe, tmp_path, capsys
):
    assert main([str(write_recipe(HUGE_LR)), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "the loss diverged" in err and "at step 2" in err and "nothing is exported" in err
    assert "kd=" in err and "feature_mse=" in err  # the terms, to see which one blew up
    run = tmp_path / "run"
    assert not (run / "export").exists() and not (run / "report.json").exists()
    assert read_metrics(run / "metrics.jsonl")[-1]["event"] == "diverged"


def test_with_the_guard_off_the_summary_and_report_open_with_a_warning(
    write_recipe, tmp_path, capsys
):
    path = write_recipe(HUGE_LR.replace("  log_every: 5\n", "  log_every: 5\n  divergence: null\n"))
    assert main([str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("warning: the student is at chance level: accuracy"), out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert any("chance level" in w for w in report["warnings"])
    first_lines = (tmp_path / "run" / "report.md").read_text().splitlines()[:4]
    assert any(line.startswith("> **Warning:** the student is at chance") for line in first_lines)


def test_a_normal_run_has_no_warning(write_recipe, tmp_path, capsys):
    assert main([str(write_recipe()), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("run folder:")
    assert "warnings" not in json.loads((tmp_path / "run" / "report.json").read_text())


def test_divergence_rule():
    guard = Divergence(DivergenceGuard(factor=10, window=5), [])
    for value in [2.0, 1.5, 1.0, 0.5, 0.1, 0.1, 0.1]:
        assert guard.problem(value, 1.0) is None
    assert guard.problem(1.5, 1.0) is None  # 15x the median, but below where it started
    assert guard.problem(1.2, math.inf)[0] == "non_finite_grad"
    assert guard.problem(math.nan, 1.0)[0] == "non_finite_loss"
    event, message = guard.problem(25.0, 1.0)
    assert event == "diverged" and "over 10x the median" in message
    # a resumed run continues from its logged losses
    resumed = Divergence(DivergenceGuard(factor=10, window=5), [{"step": 5, "loss": 2.0}])
    assert resumed.problem(30.0, 1.0)[0] == "diverged"
    assert Divergence(None, []).problem(1e30, math.inf) is None  # off: only NaN/inf losses stop


def test_a_loss_climbing_from_near_zero_is_not_divergence_until_it_passes_the_floor():
    # a student that starts as a copy of its teacher: KD near 0, then up by large ratios
    guard = Divergence(DivergenceGuard(factor=100, window=5), [])
    for value in [1e-7, -1e-8, 5e-8, 2e-4, 5.5e-3, 0.03, 0.2, 0.9]:
        assert guard.problem(value, 1.0) is None, value
    event, message = guard.problem(150.0, 1.0)  # a real blow-up from there still stops
    assert event == "diverged" and "over the floor 1" in message
    no_floor = Divergence(DivergenceGuard(factor=100, window=5, floor=0), [])
    assert no_floor.problem(1e-7, 1.0) is None and no_floor.problem(1e-7, 1.0) is None
    assert no_floor.problem(5.5e-3, 1.0)[0] == "diverged"  # floor 0: the rule as it was


def test_warnings_worse_than_it_started_and_at_chance():
    evaluator = Classification()
    evaluator.label_counts = torch.tensor([30, 50, 20])  # the commonest label: 0.5
    assert evaluator.warnings({"accuracy": 0.4}, {"accuracy": 0.9}) == []
    worse = evaluator.warnings({"accuracy": 0.8}, {"accuracy": 0.7})
    assert worse == [
        "the student ends worse than it started: accuracy 0.7 after training, 0.8 before"
    ]
    at_chance = evaluator.warnings({"accuracy": 0.3}, {"accuracy": 0.505})
    assert at_chance == [
        "the student is at chance level: accuracy 0.505, where a model that learned nothing "
        "scores 0.5"
    ]


# -- located before anything is loaded or written ---------------------------------------------
def test_a_run_name_is_a_name(write_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_recipe(output=False)
    for name in ("../outside", "a/b", ".."):
        assert main([str(path), f"name={name}", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "(name)" in err and "not a plain name" in err and "output:" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path.parent / "outside").exists()


def test_an_unwritable_output_is_located_before_the_models_load(write_recipe, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('the models would load here')\n")
    path = write_recipe(
        FAST_RECIPE.replace(
            f"{TINY}:mlp\n  kwargs: {{width: 8", f"{broken}:net\n  kwargs: {{width: 8"
        )
        + f"output: {blocker / 'run'}\n"
    )
    assert main([str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:" in err and "(output)" in err
    assert f"{blocker} is a file, so no folder can be made inside it" in err
    assert "would load here" not in err
    assert main(["validate", str(path)]) == 2  # validate says what the run would say
    assert "(output)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("report.latency_batches=[-1]", "report.latency_batches[0]"),
        ("losses.1.weight=-0.5", "losses[1].weight"),
        ("train.divergence.factor=0.5", "train.divergence.factor"),
    ],
)
def test_sizes_and_weights_must_be_positive(write_recipe, capsys, override, key):
    assert main(["validate", str(write_recipe()), override]) == 2
    assert f"({key})" in capsys.readouterr().err


NAN_MODELS = f"""\
import sys
import torch
sys.path.insert(0, {str(TINY.parent)!r})
from tiny_models import MLP, mlp


def nan_weights(**kwargs):
    model = mlp(**kwargs)
    with torch.no_grad():
        model.layers[0][0].weight[0, 0] = float("nan")
    return model


class NanOut(MLP):
    def forward(self, x):  # NaN from finite weights
        return super().forward(x) + torch.log(-x.flatten(1).abs().sum(1, keepdim=True) - 1)
"""


@pytest.mark.parametrize(
    ("teacher", "message"),
    [
        ("nan_weights", "the teacher's weights hold values that are not finite"),
        ("NanOut", "the teacher's whole graph gives"),
    ],
)
def test_validate_checks_values_not_only_types(write_recipe, tmp_path, capsys, teacher, message):
    models = tmp_path / "nan_models.py"
    models.write_text(NAN_MODELS)
    path = write_recipe(
        FAST_RECIPE.replace(
            f"{TINY}:mlp\n  kwargs: {{width: 32", f"{models}:{teacher}\n  kwargs: {{width: 32"
        )
    )
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:4:" in err and "(teacher)" in err and message in err, err
    assert not (tmp_path / "run").exists()
