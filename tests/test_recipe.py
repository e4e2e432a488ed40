from __future__ import annotations

import re

import pytest
from conftest import FAST_RECIPE, TINY

from compressor.cli import main
from compressor.errors import RecipeError, RecipeErrors
from compressor.plan import build_plan
from compressor.recipe_file import load_recipe


def _error(path, registry=None, overrides=()) -> str:
    with pytest.raises((RecipeError, RecipeErrors)) as info:
        recipe = load_recipe(path, overrides)
        build_plan(recipe, registry)
    return str(info.value)


def _line_of(path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_fast_recipe_is_valid(write_recipe, registry):
    recipe = load_recipe(write_recipe())
    assert recipe.train.steps == 30 and recipe.losses[0].options == {"temperature": 2.0}
    plan = build_plan(recipe, registry)
    assert [b.label for b in plan.losses] == ["kd", "ce", "feature_mse"]


def test_misspelt_key_names_file_line_column_and_suggests(write_recipe):
    path = write_recipe(FAST_RECIPE.replace("  batch_size: 32", "  batchsize: 32"))
    message = _error(path)
    line = _line_of(path, "batchsize")
    assert (
        f"{path}:{line}:3 (data.batchsize): unknown key 'batchsize' (did you mean 'batch_size'?)"
        in message
    )
    assert "allowed: batch_size, eval_batch_size, group_by_length, kwargs, loader" in message


def test_wrong_type_points_at_the_value(write_recipe):
    path = write_recipe(FAST_RECIPE.replace("steps: 30", "steps: lots"))
    message = _error(path)
    assert f"{path}:{_line_of(path, 'steps: lots')}:10 (train.steps)" in message
    assert "valid integer" in message and "'lots'" in message


def test_missing_required_key(write_recipe):
    path = write_recipe(FAST_RECIPE.replace("  loader: digits\n", ""))
    assert "missing required key 'data.loader'" in _error(path)


def test_unknown_loss_lists_registered_losses_with_a_suggestion(write_recipe, registry):
    path = write_recipe(FAST_RECIPE.replace("name: kd", "name: kd_loss"))
    message = _error(path, registry)
    assert (
        f"{path}:{_line_of(path, 'kd_loss')}:11 (losses[0].name): unknown loss 'kd_loss' (did you mean 'kd'?)"
        in message
    )
    assert (
        "allowed: attention_kl, ce, dpo, embedding_cosine, embedding_mse, feature_cosine, "
        "feature_l1, feature_mse, hidden_mse, kd, moe_balance, ofa" in message
    )


def test_bad_loss_option_names_the_loss_and_its_options(write_recipe, registry):
    path = write_recipe(FAST_RECIPE.replace("temperature: 2.0", "temprature: 2.0"))
    message = _error(path, registry)
    assert (
        "(losses[0].temprature): unknown key 'temprature' (did you mean 'temperature'?)" in message
    )
    assert (
        "allowed: beta, divergence, fused_head, impl, student, t2_scale, teacher, temperature"
        in message
        and "[loss 'kd']" in message
    )


def test_unknown_pass(write_recipe, registry):
    path = write_recipe(FAST_RECIPE + "passes:\n  - name: tapp\n")
    message = _error(path, registry)
    assert (
        f"{path}:{_line_of(path, 'tapp')}:11 (passes[0].name): unknown graph pass 'tapp' (did you mean 'tap'?)"
        in message
    )


def test_bad_tap_name_lists_module_paths(write_recipe, registry):
    path = write_recipe(FAST_RECIPE.replace("teacher: layers.2", "teacher: layers.9"))
    message = _error(path, registry)
    assert (
        f"{path}:{_line_of(path, 'layers.9')}:14 (losses[2].teacher): tap 'layers.9' is not a module of the teacher graph"
        in message
    )
    assert "layers.3" in message and "head" in message


def test_missing_model_file_and_weights(write_recipe, registry, tmp_path):
    path = write_recipe(
        FAST_RECIPE.replace(
            f"{TINY}:mlp\n  kwargs: {{width: 8", "nowhere.py:mlp\n  kwargs: {width: 8"
        )
    )
    assert f"file not found: {tmp_path / 'nowhere.py'}" in _error(path, registry)
    path = write_recipe(
        FAST_RECIPE.replace(
            "  kwargs: {width: 32, depth: 4}",
            "  kwargs: {width: 32, depth: 4}\n  weights: gone.safetensors",
        )
    )
    message = _error(path, registry)
    assert (
        f"{path}:{_line_of(path, 'gone.safetensors')}" in message
        and "weights file not found" in message
    )


def test_pickle_weights_are_refused(write_recipe, registry, tmp_path):
    (tmp_path / "teacher.pt").write_bytes(b"not read")
    path = write_recipe(
        FAST_RECIPE.replace(
            "  kwargs: {width: 32, depth: 4}",
            "  kwargs: {width: 32, depth: 4}\n  weights: teacher.pt",
        )
    )
    assert "is not a .safetensors file" in _error(path, registry)


def test_wrong_model_kwargs_and_non_module(write_recipe, registry):
    path = write_recipe(FAST_RECIPE.replace("{width: 8, depth: 2}", "{width: 8, dept: 2}"))
    message = _error(path, registry)
    assert "(student.kwargs)" in message and "dept" in message
    path = write_recipe(
        FAST_RECIPE.replace(f"{TINY}:mlp\n  kwargs: {{width: 8, depth: 2}}", f"{TINY}:not_a_module")
    )
    assert "returned str, not a torch.nn.Module" in _error(path, registry)
    path = write_recipe(
        FAST_RECIPE.replace(f"{TINY}:mlp\n  kwargs: {{width: 8, depth: 2}}", f"{TINY}:mpl")
    )
    assert "has no callable 'mpl' (did you mean 'mlp'?)" in _error(path, registry)


def test_loss_that_reads_a_teacher_needs_one(write_recipe, registry):
    text = re.sub(r"teacher:\n  model: .*\n  kwargs: .*\n", "", FAST_RECIPE, count=1)
    assert "loss 'kd' reads the teacher, but the recipe has no teacher" in _error(
        write_recipe(text), registry
    )


def test_duplicate_keys_and_invalid_yaml(write_recipe):
    path = write_recipe(FAST_RECIPE + "seed: 1\n")
    assert "duplicate key 'seed'" in _error(path)
    path = write_recipe("name: [unclosed\n")
    assert "invalid YAML" in _error(path)


def test_overrides_set_nested_keys_and_list_items(write_recipe):
    recipe = load_recipe(
        write_recipe(), ["train.steps=7", "losses.0.weight=0.25", "report.baseline=true"]
    )
    assert recipe.train.steps == 7 and recipe.losses[0].weight == 0.25 and recipe.report.baseline


def test_bad_overrides_point_at_the_command_line(write_recipe):
    path = write_recipe()
    assert "<command line> (train.stepz): unknown key 'stepz' (did you mean 'steps'?)" in _error(
        path, overrides=["train.stepz=3"]
    )
    assert "<command line> (train.steps)" in _error(path, overrides=["train.steps=-1"])
    assert "is not key.path=value" in _error(path, overrides=["train.steps"])
    assert "not an index" in _error(path, overrides=["losses.9.weight=1"])


def test_length_grouping_needs_items_with_lengths(write_recipe, registry):
    path = write_recipe(
        FAST_RECIPE.replace("  batch_size: 32", "  batch_size: 32\n  group_by_length: true")
    )
    message = _error(path, registry)
    line = _line_of(path, "group_by_length")
    assert f"{path}:{line}:3 (data.group_by_length): group_by_length needs a length" in message
    assert "'digits' loader's items have no attention_mask" in message


BROKEN = {
    "misspelt key": ("  batch_size: 32", "  batch_sise: 32"),
    "wrong type": ("steps: 30", "steps: [1]"),
    "unknown pass": ("train:", "passes:\n  - name: trunc\ntrain:"),
    "bad tap": ("student: layers.1", "student: layers.7"),
    "missing file": (f"{TINY}:mlp\n  kwargs: {{width: 8", "missing.py:mlp\n  kwargs: {width: 8"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_cli_gives_one_clear_error_and_writes_nothing(case, write_recipe, tmp_path, capsys):
    old, new = BROKEN[case]
    assert old in FAST_RECIPE
    path = write_recipe(FAST_RECIPE.replace(old, new))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:") and err.count("error:") == 1
    assert not (tmp_path / "run").exists()


def test_missing_recipe_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
