"""Preference distillation: the dpo loss with the teacher as reference, preference pairs
(jsonl, or built from prose), the preference evaluator, and a mimic-then-preference staged
run of an upcycled student."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_folder

from compressor.errors import RecipeError, RecipeErrors
from compressor.loading import IGNORE
from compressor.losses import LossInputs
from compressor.pipeline import run
from compressor.plan import build_plan
from compressor.plugins.preference import DPO, DPOOptions, collate_pairs, response_logprobs
from compressor.recipe_file import load_recipe

pytest.importorskip("transformers")


def _pair_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two pairs (4 rows, chosen first) over a 5-token vocabulary: prompt 2 tokens."""
    labels = torch.tensor(
        [
            [IGNORE, IGNORE, 1, 2, IGNORE],
            [IGNORE, IGNORE, 3, 3, 4],
            [IGNORE, IGNORE, 0, 0, IGNORE],
            [IGNORE, IGNORE, 2, 1, 1],
        ]
    )
    logits = torch.randn(4, 5, 5, generator=torch.Generator().manual_seed(0))
    return logits, labels


def test_response_log_probabilities_score_only_response_tokens_one_position_ahead():
    logits, labels = _pair_batch()
    got = response_logprobs(logits, labels)
    logp = logits.log_softmax(-1)
    want = torch.stack(
        [
            sum(logp[r, t - 1, labels[r, t]] for t in range(1, 5) if labels[r, t] != IGNORE)
            for r in range(4)
        ]
    )
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("form, at_reference", [("sigmoid", math.log(2)), ("kto_pair", 0.5)])
def test_dpo_is_its_reference_value_at_the_teacher_and_learns_to_prefer_chosen(form, at_reference):
    logits, labels = _pair_batch()
    term = DPO(DPOOptions(beta=0.5, form=form))
    same = term(LossInputs({"output": logits}, {"output": logits}, labels))
    assert float(same) == pytest.approx(at_reference, abs=1e-6)
    student = logits.clone().requires_grad_(True)
    for _ in range(20):  # gradient descent on the student's logits raises its margin
        loss = term(LossInputs({"output": student}, {"output": logits}, labels))
        (grad,) = torch.autograd.grad(loss, student)
        student = (student - 1.0 * grad).detach().requires_grad_(True)
    chosen, rejected = response_logprobs(student, labels).split(2)
    ref_c, ref_r = response_logprobs(logits, labels).split(2)
    assert bool(((chosen - ref_c) > (rejected - ref_r)).all())
    assert float(loss.detach()) < at_reference


def test_a_batch_of_pairs_puts_every_chosen_row_before_the_rejected_ones():
    def item(n):
        ids = torch.tensor([[n, n, 0, 0], [n, -n, -n, 0]])
        mask = (ids != 0).long()
        return {"input_ids": ids, "attention_mask": mask}, torch.where(mask.bool(), ids, IGNORE)

    x, y = collate_pairs([item(1), item(2), item(3)])
    assert x["input_ids"][:, 0].tolist() == [1, 2, 3, 1, 2, 3]
    assert x["input_ids"][3].tolist() == [1, -1, -1]  # padding columns trimmed to the longest
    assert y.shape == (6, 3)


def _recipe(folder: Path, out: Path, data: str) -> str:
    return f"""\
name: preference
output: {out}
teacher: {{loader: hf, model: {folder}, task: causal-lm}}
student: {{from_teacher: true}}
data:
  loader: preference
  kwargs: {data}
  batch_size: 4
  eval_batch_size: 8
losses:
  - {{name: dpo}}
train: {{steps: 2, log_every: 1, eval_every: 2, checkpoint_every: 2}}
report: {{latency_batches: [2], latency_repeats: 1}}
"""


def test_jsonl_pairs_train_and_evaluate_and_a_bad_row_is_located(tmp_path, registry):
    folder = tiny_llama_folder(tmp_path)
    rows = [
        {"prompt": f"Question {i}: what is a list?", "chosen": " A sequence.", "rejected": " Blue."}
        for i in range(10)
    ]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "recipe.yaml"
    path.write_text(_recipe(folder, tmp_path / "run", f"{{source: {pairs}, max_length: 24}}"))
    recipe = load_recipe(path)
    plan = build_plan(recipe, registry)
    x, y = plan.data.batch("train", range(3), torch.device("cpu"))
    assert x["input_ids"].shape[0] == 6
    assert torch.equal(x["input_ids"][0, :5], x["input_ids"][3, :5])  # one prompt per pair
    assert bool((y[:, :5] == IGNORE).all())  # prompts are not scored
    summary = run(recipe, registry, progress=False)
    quality = summary.report["models"]["student"]["quality"]
    assert set(quality) == {"preference_accuracy", "teacher_preference_accuracy", "reward_accuracy"}
    assert 0 <= quality["preference_accuracy"] <= 1

    pairs.write_text(pairs.read_text() + '{"prompt": "p", "chosen": "c"}\n')
    with pytest.raises((RecipeError, RecipeErrors), match=r"pairs.jsonl:11: not a JSON object"):
        build_plan(load_recipe(path), registry)


def test_mimic_then_preference_stages_of_an_upcycled_student(tmp_path, registry):
    folder = tiny_llama_folder(tmp_path, tied=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"""\
name: moe-stages
output: {tmp_path / "run"}
teacher: {{loader: hf, model: {folder}, task: causal-lm}}
student: {{from_teacher: true}}
module_passes:
  - {{name: moe_upcycle, experts: 4, top_k: 2, layers: all, init: split, router_std: 0.5}}
data:
  loader: text
  kwargs: {{source: prose, task: language-modeling, max_length: 16, limit: 48}}
  batch_size: 4
  eval_batch_size: 8
losses:
  - {{name: kd}}
  - {{name: moe_balance}}
train: {{steps: 2, log_every: 1, eval_every: 2, checkpoint_every: 2, trainable: ["*.mlp.*"]}}
stages:
  - name: mimic
  - name: preference
    data:
      loader: preference
      kwargs: {{source: prose, limit: 16, prompt_tokens: 6, response_tokens: 6, max_length: 16}}
      batch_size: 4
      eval_batch_size: 8
    losses:
      - {{name: dpo, beta: 0.1}}
      - {{name: moe_balance}}
export:
  - {{name: hf}}
report: {{latency_batches: [2], latency_repeats: 1, export_teacher: false}}
"""
    )
    summary = run(load_recipe(path), registry, progress=False)
    report = summary.report
    assert [s["name"] for s in report["stages"]] == ["mimic", "preference"]
    assert "kl_to_teacher" in report["stages"][0]["final_eval"]  # the mimic stage's own metric
    assert "preference_accuracy" in report["models"]["student"]["quality"]
    loads = [v for k, v in report["observed"].items() if k.startswith("moe_balance/load_expert")]
    assert len(loads) == 4 and sum(loads) == pytest.approx(1.0, abs=1e-5)
    student = report["models"]["student"]
    assert student["active_parameters"] < student["parameters"]
    assert summary.exports[0].ok
    text = (summary.run_dir / "report.md").read_text()
    assert "mixture of experts" in text and "moe_balance/load_max" in text
