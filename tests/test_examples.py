"""Every shipped recipe must stay valid, and the shipped teacher must be the trained one."""

from __future__ import annotations

import pytest
import torch
from conftest import DIGITS, ROOT

from compressor.engine import evaluate
from compressor.plan import build_plan
from compressor.recipe import load_recipe

RECIPES = sorted((ROOT / "examples").rglob("*.yaml"))


def test_examples_exist():
    assert DIGITS / "recipe.yaml" in RECIPES and DIGITS / "teacher.yaml" in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipe_validates_and_says_how_to_run_it(path, registry):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path} should open with a comment"
    assert f"compress {path.relative_to(ROOT)}" in path.read_text()
    plan = build_plan(load_recipe(path), registry)
    assert plan.student_graph is not None


def test_shipped_digits_teacher_is_trained(registry):
    plan = build_plan(load_recipe(DIGITS / "recipe.yaml"), registry)
    assert plan.teacher is not None
    scores = evaluate(plan.teacher, plan.data.eval, 256, torch.device("cpu"))
    assert scores["accuracy"] > 0.98
    assert sum(p.numel() for p in plan.teacher.parameters()) > 50 * sum(
        p.numel() for p in plan.student.parameters()
    )
