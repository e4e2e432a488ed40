"""The core's promises: data flows one way with every component built once, user files
import their neighbours and fail located, and failures say where they happened."""

from __future__ import annotations

import collections
import json

import pytest
from conftest import FAST_RECIPE, TINY

from compressor import capture as capture_module
from compressor.api import LossTerm, NoOptions
from compressor.cli import main
from compressor.components import Component
from compressor.errors import Problem, RecipeError, RecipeErrors
from compressor.hookspecs import hookimpl
from compressor.pipeline import run
from compressor.plan import build_plan
from compressor.recipe_file import load_recipe
from compressor.registry import Registry


def test_each_component_is_built_once_and_nothing_after_the_plan_captures(
    write_recipe, monkeypatch, registry
):
    built: collections.Counter[str] = collections.Counter()
    captures = []
    init = Component.__init__

    def counting(self, options=None):
        built[type(self).__name__] += 1
        init(self, options)

    monkeypatch.setattr(Component, "__init__", counting)
    real_capture = capture_module.capture_module
    monkeypatch.setattr(
        capture_module,
        "capture_module",
        lambda *a, **k: captures.append(a[2]) or real_capture(*a, **k),
    )
    import compressor.plugins.capture as capture_plugin

    monkeypatch.setattr(capture_plugin, "capture_module", capture_module.capture_module)

    recipe = load_recipe(write_recipe(), registry=registry)
    plan = build_plan(recipe, registry)
    after_plan, captured = dict(built), list(captures)
    # teacher and student, in training and eval form: the eval-form teacher shares a capture
    assert sorted(captured) == ["student", "student", "teacher"]
    assert after_plan == {
        "CallableModel": 2,  # the teacher's and the student's entries
        "Digits": 1,
        "LogitKD": 1,
        "CrossEntropy": 1,
        "FeatureMSE": 1,
        "AdamW": 1,
        "Constant": 1,
        "ONNXExporter": 1,
        "Tap": 1,
        "TruncateTeacher": 1,
        "Strip": 1,
        "Classification": 1,
    }
    del plan
    built.clear()
    captures.clear()
    summary = run(recipe, registry, progress=False)  # plans again: one build per component
    assert dict(built) == after_plan and sorted(captures) == sorted(captured)
    assert {e["label"] for e in summary.report["exports"]} == {"onnx"}


def test_two_exporters_of_one_name_keep_their_own_files_and_rows(write_recipe, tmp_path, registry):
    text = FAST_RECIPE + "export:\n  - {name: onnx}\n  - {name: onnx, opset: 18}\n"
    summary = run(load_recipe(write_recipe(text)), registry, progress=False)
    labels = [(e["label"], e["path"]) for e in summary.report["exports"]]
    assert [label for label, _ in labels] == ["onnx", "onnx_1"]
    assert labels[0][1] != labels[1][1]
    assert set(summary.report["models"]["student"]["latency_ms"]) == {"pytorch", "onnx", "onnx_1"}


def _user_recipe(tmp_path, models: str) -> str:
    (tmp_path / "models.py").write_text(models)
    return FAST_RECIPE.replace(
        f"model: {TINY}:mlp\n  kwargs: {{width: 8, depth: 2}}", "model: models.py:student"
    ).replace("  - name: feature_mse\n    student: layers.1\n    teacher: layers.2\n", "")


def test_a_model_file_imports_its_neighbours(write_recipe, tmp_path, registry):
    (tmp_path / "my_layers.py").write_text(
        "from torch import nn\n\ndef net():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n"
    )
    models = "from my_layers import net\n\ndef student():\n    return net()\n"
    plan = build_plan(load_recipe(write_recipe(_user_recipe(tmp_path, models))), registry)
    assert sum(p.numel() for p in plan.student.parameters()) == 650


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        ("x = 1 / 0\n", "importing models.py raised ZeroDivisionError: division by zero"),
        (
            "def student():\n    raise ValueError('width must be even')\n",
            "calling student() raised ValueError: width must be even",
        ),
        ("import not_a_module_anywhere\n", "ModuleNotFoundError: No module named"),
    ],
)
def test_an_exception_in_user_code_is_located_at_the_recipe_key_and_the_user_line(
    models, expected, write_recipe, tmp_path, capsys
):
    path = write_recipe(_user_recipe(tmp_path, models))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:" in err and ("(student.model)" in err or "(student.kwargs)" in err)
    assert expected in err, err
    assert f"at {tmp_path / 'models.py'}:" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_recipe_that_is_not_text_or_not_a_file_is_a_located_error(tmp_path, capsys):
    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(bytes(range(256)) * 4)
    assert main(["validate", str(garbage)]) == 2
    err = capsys.readouterr().err
    assert f"{garbage}: not UTF-8 text (byte 0x80 at offset 128)" in err
    control = tmp_path / "control.yaml"
    control.write_text("name: a\x00b\n")
    assert main([str(control)]) == 2
    assert f"{control}: invalid YAML" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "is a folder, not a recipe file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["control.yaml", "garbage.yaml"]


class LabRules:
    @hookimpl
    def compressor_validate_recipe(self, recipe):
        if recipe.train.steps % 10:
            return [
                Problem("steps must be a multiple of 10 here", ("train", "steps"), "10, 20, ...")
            ]
        return []


def test_problems_from_check_hooks_are_located_at_their_key(write_recipe):
    path = write_recipe(FAST_RECIPE.replace("steps: 30", "steps: 33"))
    with pytest.raises(RecipeErrors) as caught:
        build_plan(load_recipe(path), Registry.load(extra=(LabRules(),)))
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "steps: 33" in t)
    assert f"{path}:{line}:10 (train.steps): steps must be a multiple of 10 here" in str(
        caught.value
    )
    assert "allowed: 10, 20, ..." in str(caught.value)


def test_a_failure_during_a_run_names_the_phase_and_logs_the_traceback(
    write_recipe, tmp_path, capsys
):
    boom = tmp_path / "boom.py"
    boom.write_text(
        "import torch\nfrom compressor.api import LossTerm, NoOptions, hookimpl\n\n"
        "class Boom(LossTerm[NoOptions]):\n"
        "    name = 'boom'\n"
        "    needs_teacher = False\n"
        "    calls = 0\n\n"
        "    def forward(self, inputs):\n"
        "        Boom.calls += 1\n"
        "        if Boom.calls == 6:  # the rehearsal is call 1, step 5 is call 6\n"
        "            raise RuntimeError('the loss ran out of luck')\n"
        "        return inputs.student['output'].sum() * 0\n\n"
        "@hookimpl\ndef compressor_losses():\n    return [Boom]\n"
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        path = write_recipe(FAST_RECIPE.replace("losses:\n", "losses:\n  - name: boom\n"))
        assert main(["-p", "boom", str(path), "--quiet"]) == 1
    finally:
        sys.path.remove(str(tmp_path))
    err = capsys.readouterr().err
    log = tmp_path / "run" / "error.log"
    assert "training step 5: loss 'boom' failed: RuntimeError: the loss ran out of luck" in err
    assert f"full traceback: {log}" in err and "Traceback" not in err
    assert "the loss ran out of luck" in log.read_text() and "boom.py" in log.read_text()


class PerSample(LossTerm[NoOptions]):
    """Squared error per sample: a loss that forgot to reduce."""

    name = "per_sample"

    def forward(self, inputs):
        return ((inputs.student["output"] - inputs.teacher["output"]) ** 2).mean(dim=1)


class PerSampleLoss:
    @hookimpl
    def compressor_losses(self):
        return [PerSample]


def test_a_loss_that_is_not_one_number_is_located_at_the_loss_with_its_shape(write_recipe):
    path = write_recipe(FAST_RECIPE.replace("losses:\n", "losses:\n  - name: per_sample\n"))
    with pytest.raises(RecipeError) as caught:
        build_plan(load_recipe(path), Registry.load(extra=(PerSampleLoss(),)))
    message = str(caught.value)
    assert "(losses[0]): loss 'per_sample' returned a torch.float32 tensor of shape [32]" in message
    assert "returns a 0-dim floating-point tensor" in message


def test_a_run_that_failed_before_its_first_checkpoint_can_run_again(write_recipe, tmp_path):
    path = write_recipe()
    # a learning rate that blows the loss up at step 2, before any checkpoint
    assert main([str(path), "--quiet", "train.optimizer.lr=1000"]) == 1
    left = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert left == [".owned.json", "metrics.jsonl", "recipe.yaml"]
    assert main([str(path), "--quiet", "train.steps=5"]) == 0
    assert json.loads((tmp_path / "run" / "report.json").read_text())["steps"] == 5


def test_an_implementation_that_cannot_run_here_fails_validate_at_the_loss(
    write_recipe, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    path = write_recipe(
        FAST_RECIPE.replace("temperature: 2.0\n", "temperature: 2.0\n    impl: triton\n")
    )
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "(losses[0]): loss 'kd' fails on one training batch of 32" in err
    assert "loss implementation 'triton' cannot run" in err
    assert not (tmp_path / "run").exists()
