"""`teacher: {recipe: other.yaml}`: a teacher that another recipe trains, run first when
missing, reused after, refused when stale, and validated as a chain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY

from compressor.cli import main
from compressor.errors import RecipeError
from compressor.plan import build_plan
from compressor.recipe_file import load_recipe

# the teacher: an MLP trained on labels alone
TEACHER = f"""\
name: chain-teacher
output: {{out}}/teacher-run
student:
  model: {TINY}:mlp
  kwargs: {{{{width: 32, depth: 3}}}}
data:
  loader: digits
  kwargs: {{{{train_limit: 256, flatten: true}}}}
  batch_size: 32
losses: [{{{{name: ce}}}}]
train: {{{{steps: {{steps}}, optimizer: {{{{name: adamw, lr: 0.01}}}}, eval_every: 20, checkpoint_every: 20}}}}
export: []
"""
STUDENT = f"""\
name: chain-student
output: {{out}}/student-run
teacher: {{{{recipe: teacher.yaml}}}}
student:
  model: {TINY}:mlp
  kwargs: {{{{width: 8, depth: 2}}}}
data:
  loader: digits
  kwargs: {{{{train_limit: 256, flatten: true}}}}
  batch_size: 32
losses: [{{{{name: kd, temperature: 2.0}}}}]
train: {{{{steps: 10, eval_every: 10, checkpoint_every: 10}}}}
export: []
"""


def _write(tmp_path: Path, steps: int = 60) -> Path:
    (tmp_path / "teacher.yaml").write_text(TEACHER.format(out=tmp_path, steps=steps))
    path = tmp_path / "student.yaml"
    path.write_text(STUDENT.format(out=tmp_path))
    return path


def test_validate_checks_a_teacher_recipe_that_has_not_run(tmp_path, capsys):
    recipe = _write(tmp_path)
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "teacher.yaml has not run; it is valid, and `compress` trains it first" in out
    assert not (tmp_path / "teacher-run").exists()  # validating trains nothing


def test_a_teacher_recipe_is_trained_first_then_reused(tmp_path, capsys):
    recipe = _write(tmp_path)
    assert main([str(recipe), "--quiet"]) == 0
    assert "training it first" in capsys.readouterr().err
    teacher = json.loads((tmp_path / "teacher-run" / "report.json").read_text())
    student = json.loads((tmp_path / "student-run" / "report.json").read_text())
    # the distilling run's teacher is the trained student of teacher.yaml, weights and all
    trained = teacher["models"]["student"]["quality"]["accuracy"]
    assert student["models"]["teacher"]["quality"]["accuracy"] == trained > 0.5

    written = (tmp_path / "teacher-run" / "report.json").stat().st_mtime_ns
    assert main([str(recipe), "--quiet", "--overwrite"]) == 0
    assert "training it first" not in capsys.readouterr().err
    assert (tmp_path / "teacher-run" / "report.json").stat().st_mtime_ns == written
    assert main(["validate", str(recipe)]) == 0
    assert "the finished run" in capsys.readouterr().out

    # a teacher run made from another version of its recipe is not reused
    _write(tmp_path, steps=61)
    assert main([str(recipe), "--quiet", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "teacher.yaml" in err and "made from another version of this recipe" in err


def test_a_planned_teacher_that_has_not_run_is_refused_outside_validate(tmp_path, registry):
    with pytest.raises(RecipeError, match="has not finished") as info:
        build_plan(load_recipe(_write(tmp_path)), registry)
    assert "student.yaml:3" in str(info.value)  # at the teacher's recipe key


def test_a_recipe_cannot_teach_itself(tmp_path, capsys):
    recipe = _write(tmp_path)
    teacher = tmp_path / "teacher.yaml"
    teacher.write_text(teacher.read_text() + "teacher: {recipe: student.yaml}\n")
    assert main(["validate", str(recipe)]) == 2
    assert "already in this chain of teachers" in capsys.readouterr().err


def test_a_teacher_recipe_named_by_several_stages_is_trained_once(tmp_path, capsys):
    recipe = _write(tmp_path)
    staged = recipe.read_text().replace(
        "train: {steps: 10, eval_every: 10, checkpoint_every: 10}\n",
        "train: {steps: 10, eval_every: 10, checkpoint_every: 10}\n"
        "stages:\n"
        "  - {name: first, teacher: {recipe: teacher.yaml}, steps: 5}\n"
        "  - {name: second, teacher: {recipe: teacher.yaml}, steps: 5}\n",
    )
    recipe.write_text(staged)
    assert main([str(recipe), "--quiet"]) == 0
    assert capsys.readouterr().err.count("training it first") == 1
