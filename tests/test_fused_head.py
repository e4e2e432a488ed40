"""`kd` with `fused_head: true`: the loss reads both lm_heads' inputs and weights and never
holds [tokens, vocab] logits, with the same loss and gradients as the unfused `kd`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import save_hf_folder

from compressor.errors import CompressorError
from compressor.pipeline import run
from compressor.plan import build_plan
from compressor.plugins.losses import KDOptions
from compressor.recipe_file import load_recipe

transformers = pytest.importorskip("transformers")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tv", "soft_ce")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fused")
    torch.manual_seed(0)
    sizes = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4)
    return {
        # a tied head (SmolLM2's form)
        "llama": save_hf_folder(
            root,
            "llama",
            transformers.LlamaForCausalLM(
                transformers.LlamaConfig(
                    **sizes,
                    vocab_size=30522,
                    intermediate_size=64,
                    num_key_value_heads=2,
                    tie_word_embeddings=True,
                )
            ),
        ),
        # an untied head on a different family
        "qwen2": save_hf_folder(
            root,
            "qwen2",
            transformers.Qwen2ForCausalLM(
                transformers.Qwen2Config(
                    **sizes,
                    vocab_size=30522,
                    intermediate_size=64,
                    num_key_value_heads=2,
                    tie_word_embeddings=False,
                )
            ),
        ),
        # soft-caps its logits after the head
        "gemma2": save_hf_folder(
            root,
            "gemma2",
            transformers.Gemma2ForCausalLM(
                transformers.Gemma2Config(
                    **sizes,
                    vocab_size=30522,
                    intermediate_size=64,
                    num_key_value_heads=2,
                    head_dim=8,
                    final_logit_softcapping=30.0,
                )
            ),
        ),
    }


def _recipe(tmp_path: Path, folder: Path, kd: str, extra_loss: str = "") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""\
output: {tmp_path / "run"}
teacher: {{loader: hf, model: {folder}, task: causal-lm}}
student: {{from_teacher: true}}
module_passes: [{{name: student_layers, layers: [0, 2]}}]
data:
  loader: text
  kwargs: {{source: prose, task: language-modeling, max_length: 24, limit: 80}}
  batch_size: 4
losses:
  - {kd}
{extra_loss}train: {{steps: 2, log_every: 1, eval_every: 2, checkpoint_every: 2}}
export: [{{name: hf}}]
report: {{latency_batches: [1], latency_repeats: 1, export_teacher: false}}
""")
    return path


def _loss_and_grads(plan, x, y) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    for p in plan.student.parameters():
        p.grad = None
    loss = sum(plan.loss_terms(x, y).values())
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in plan.student.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_and_unfused_kd_give_the_same_loss_and_gradients(models, tmp_path, registry, family):
    plans = {
        fused: build_plan(
            load_recipe(_recipe(tmp_path, models[family], f"{{name: kd, fused_head: {fused}}}")),
            registry,
        )
        for fused in ("false", "true")
    }
    plain, fused = plans["false"], plans["true"]
    x, y = plain.data.batch("train", range(4), plain.device)
    # masks as padding and a prompt make them: a padded row end, an unscored prompt
    x["attention_mask"][1, -7:] = 0
    y[1, -7:] = -100
    y[2, :9] = -100
    for divergence in DIVERGENCES:
        for plan in (plain, fused):
            plan.losses[0].term.options = KDOptions(
                divergence=divergence,
                temperature=2.0,
                beta=0.3,
                # the oracle against the chunked kernel, which the fused head runs on CPU
                impl="chunked" if plan is fused else "reference",
                fused_head=plan is fused,
            )
        want, want_grads = _loss_and_grads(plain, x, y)
        got, got_grads = _loss_and_grads(fused, x, y)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=divergence)
        assert set(got_grads) == set(want_grads)
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # the training graphs hold no [tokens, vocab] logits; the eval graph keeps its head
    vocab = 30522
    for gm in (fused.student_graph, fused.teacher_graph):
        shapes = [n.meta.get("val") for n in gm.graph.nodes if n.op == "call_function"]
        assert not any(
            isinstance(v, torch.Tensor) and v.dim() > 1 and v.shape[-1] == vocab for v in shapes
        )
    assert any(
        "lm_head" in str(n.meta.get("nn_module_stack", ""))
        for n in fused.student_eval_graph.graph.nodes
    )
    assert any("fused_head" in note for note in fused.notes)


def test_a_fused_kd_run_trains_and_exports_a_student_with_its_head(models, tmp_path, registry):
    recipe = load_recipe(_recipe(tmp_path, models["llama"], "{name: kd, fused_head: true}"))
    summary = run(recipe, registry, progress=False)
    (export,) = summary.exports
    assert export.ok, export.details
    models = summary.report["models"]
    student, teacher = models["student"]["quality"], models["teacher"]["quality"]
    assert student["perplexity"] > 0 and student["kl_to_teacher"] > 0
    assert 0 <= student["top1_agreement"] <= 1
    # the teacher's exported graph scored against the teacher itself
    assert teacher["kl_to_teacher"] < 1e-6 and teacher["top1_agreement"] == 1.0


def test_another_loss_reading_the_logits_keeps_the_students_head(models, tmp_path, registry):
    recipe = load_recipe(
        _recipe(
            tmp_path,
            models["llama"],
            "{name: kd, fused_head: true}",
            extra_loss="  - {name: ce, weight: 0.5}\n",
        )
    )
    plan = build_plan(recipe, registry)
    assert any("still computes them" in note for note in plan.notes)
    x, y = plan.data.batch("train", range(4), plan.device)
    terms = plan.loss_terms(x, y)
    assert set(terms) == {"kd", "ce"} and all(torch.isfinite(v) for v in terms.values())


def test_soft_capped_logits_are_refused(models, tmp_path, registry):
    recipe = load_recipe(_recipe(tmp_path, models["gemma2"], "{name: kd, fused_head: true}"))
    with pytest.raises(CompressorError, match="soft-capping") as info:
        build_plan(recipe, registry)
    assert "fused_head" in str(info.value) and "`mul`" in str(info.value)  # x / cap, tanh, * cap


def test_fused_head_takes_no_taps(models, tmp_path, registry):
    recipe = load_recipe(
        _recipe(tmp_path, models["llama"], "{name: kd, fused_head: true, student: model.norm}")
    )
    with pytest.raises(CompressorError, match="takes no student or teacher tap"):
        build_plan(recipe, registry)


@pytest.mark.parametrize("sparse", [False, True])
def test_the_fused_head_under_bf16_autocast_matches_unfused(sparse):
    """As loss_terms runs on GPUs (CPU autocast here): the heads in bf16, the rest in fp32."""
    from compressor.cuda import kernels, reference
    from compressor.cuda.sparse import sparse_divergence, top_k_targets

    torch.manual_seed(0)
    hidden = torch.randn(24, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(24, 16), torch.randn(300, 16)
    with torch.autocast("cpu", torch.bfloat16):
        if sparse:
            targets = top_k_targets(teacher_hidden, 16, 2.0, teacher_weight)
            got = sparse_divergence(hidden.bfloat16(), targets, temperature=2.0, weight=weight)
            want = sparse_divergence(F.linear(hidden, weight), targets, temperature=2.0)
        else:
            got = kernels.linear_divergence(
                hidden.bfloat16(),
                weight,
                teacher_hidden,
                teacher_weight,
                temperature=2.0,
                impl="chunked",
            )
            want = reference.linear_divergence(
                hidden, weight, teacher_hidden, teacher_weight, temperature=2.0
            )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-3)
    for g, w in zip(
        torch.autograd.grad(got, [hidden, weight]),
        torch.autograd.grad(want, [hidden, weight]),
        strict=True,
    ):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=5e-2, atol=5e-3)
