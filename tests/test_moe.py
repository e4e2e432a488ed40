"""Mixture-of-experts students (`moe_upcycle`), Hugging Face MoE models (`moe_routing`), the
load-balancing loss, freezing by pattern, and the Qwen2-MoE checkpoint and ONNX export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OPTIMUM, optimum_checked, save_hf_folder
from torch import nn

from compressor.capture import capture_module
from compressor.errors import CaptureError, RecipeError, RecipeErrors
from compressor.module_pass import ModulePassContext
from compressor.passes.moe_upcycle import MoERouting, MoEUpcycle, MoEUpcycleOptions
from compressor.pipeline import run
from compressor.plan import build_plan
from compressor.plugins.hf import HFModule
from compressor.plugins.moe_block import MoEBlock
from compressor.plugins.ort_decoder import OrtDecoder
from compressor.recipe_file import load_recipe

transformers = pytest.importorskip("transformers")
SIZES = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=30522,
    intermediate_size=64,
    max_position_embeddings=128,
)
FAMILIES = {  # Mistral is named nowhere in the MoE code: the held-out family
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SIZES)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**SIZES)),
}


def _decoder(family: str = "llama") -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[family]().eval()


def _upcycle(model: nn.Module, **options) -> HFModule:
    module = HFModule(model, "causal-lm")
    MoEUpcycle(MoEUpcycleOptions(**options))(module, ModulePassContext("student", None))
    return module


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("shared_expert", [False, True])
def test_copied_experts_give_the_dense_output_for_any_routing(top_k, shared_expert):
    model = _decoder()
    dense = _logits(model, IDS)
    for seed in range(3):  # routers far from uniform: any routing must give the same output
        model = _decoder()
        _upcycle(
            model,
            experts=4,
            top_k=top_k,
            layers="all",
            router_std=2.0,
            seed=seed,
            shared_expert=shared_expert,
        )
        blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
        assert len(blocks) == 4 and all(b.num_experts == 4 for b in blocks)
        torch.testing.assert_close(_logits(model, IDS), dense, atol=1e-5, rtol=1e-5)


def test_split_experts_all_active_equal_the_dense_ffn_and_fewer_are_fewer_parameters():
    model = _decoder()
    dense = _logits(model, IDS)
    _upcycle(model, experts=4, top_k=4, init="split", router_std=0.0, layers="all")
    torch.testing.assert_close(_logits(model, IDS), dense, atol=1e-5, rtol=1e-5)

    from compressor.passes.moe_upcycle import parameter_counts

    sparse = _decoder()
    base = sum(p.numel() for p in sparse.parameters())
    _upcycle(sparse, experts=4, top_k=1, init="split", layers="all")
    total, active = parameter_counts(sparse)
    ffn = 3 * 32 * 64 * 4  # gate/up/down of the four dense FFNs
    router = 4 * 32 * 4
    assert total == base + router
    assert active == base - ffn + ffn // 4 + router  # a token runs one of four slices


def test_drop_upcycling_makes_experts_differ_from_the_dense_ffn():
    model = _decoder()
    _upcycle(model, experts=2, top_k=1, init="drop", drop_ratio=0.5, layers=[1])
    block = model.model.layers[1].mlp
    assert isinstance(block, MoEBlock)
    a, b = (e.up_proj.weight for e in block.experts)
    changed = (a != b).any(dim=1)  # rows of re-initialised channels
    assert 0 < int(changed.sum()) <= 64
    assert isinstance(model.model.layers[0].mlp, transformers.models.llama.modeling_llama.LlamaMLP)


def test_a_plain_mlp_and_a_bert_encoder_upcycle_to_the_same_outputs():
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(8, 16),
        nn.ReLU(),
        nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)),
        nn.Linear(16, 4),
    )
    x = torch.randn(5, 8)
    want = mlp(x)
    MoEUpcycle(MoEUpcycleOptions(modules=["2"], init="split", experts=4, top_k=4, router_std=0))(
        mlp, ModulePassContext("student", None)
    )
    assert isinstance(mlp[2], MoEBlock)
    torch.testing.assert_close(mlp(x), want, atol=1e-6, rtol=1e-5)

    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
    )
    bert = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 6))
    want = bert(input_ids=ids).last_hidden_state
    module = HFModule(bert, "feature-extraction")
    MoEUpcycle(MoEUpcycleOptions(layers="all", router_std=1.0, shared_expert=True))(
        module, ModulePassContext("student", None)
    )
    assert isinstance(bert.encoder.layer[1].intermediate, MoEBlock)
    with torch.no_grad():
        torch.testing.assert_close(
            bert(input_ids=ids).last_hidden_state, want, atol=1e-5, rtol=1e-5
        )


def test_upcycled_blocks_capture_with_dynamic_batch_and_sequence_and_jitter_only_trains():
    model = _decoder()
    module = _upcycle(model, layers="every_other", router_std=1.0, jitter=0.1)
    x = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    gm = capture_module(module, (x,), "student", "export")
    other = torch.randint(0, 1000, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(
            gm(input_ids=other, attention_mask=torch.ones_like(other)), _logits(model, other)
        )
    assert not any("nonzero" in str(n.target) for n in gm.graph.nodes)
    block = model.model.layers[1].mlp
    h = torch.randn(2, 3, 32)
    block.eval()
    torch.testing.assert_close(block(h), block(h))  # no noise in eval
    block.train()
    assert not torch.equal(block.gate(h), block.gate(h * 1.05))


def _tiny_qwen2_moe() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(
        **{**SIZES, "vocab_size": 1000},
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        mlp_only_layers=[0],
    )
    return transformers.Qwen2MoeForCausalLM(config).eval()


def test_a_hugging_face_moe_model_captures_after_moe_routing_with_the_same_outputs():
    model = _tiny_qwen2_moe()
    want = _logits(model, IDS)
    module = HFModule(model, "causal-lm")
    x = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    if transformers.__version__.startswith("4."):  # `nonzero` over the experts hit
        with pytest.raises(CaptureError, match="data-dependent"):
            capture_module(module, (x,), "teacher", "export")
    context = ModulePassContext("teacher", None)
    MoERouting(None)(module, context)
    assert "3 sparse MoE block(s)" in context.notes[0]
    torch.testing.assert_close(_logits(model, IDS), want, atol=1e-6, rtol=1e-5)
    gm = capture_module(module, (x,), "teacher", "export")
    with torch.no_grad():
        torch.testing.assert_close(gm(**x), want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="no Hugging Face sparse MoE block"):
        MoERouting(None)(HFModule(_decoder(), "causal-lm"), context)


def test_an_upcycled_student_saves_as_a_qwen2_moe_checkpoint_transformers_reloads(tmp_path):
    from compressor.plugins.hf_moe import checkpoint_model

    for family in FAMILIES:
        model = _decoder(family)
        _upcycle(model, layers="every_other", init="split", experts=4, top_k=2)
        want = _logits(model, IDS)
        saved = checkpoint_model(model)
        saved.save_pretrained(tmp_path / family)
        config = json.loads((tmp_path / family / "config.json").read_text())
        assert config["model_type"] == "qwen2_moe"
        assert config["mlp_only_layers"] == [0, 2] and config["num_experts"] == 4
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / family).eval()
        torch.testing.assert_close(_logits(back, IDS), want, atol=1e-5, rtol=1e-5)


def test_a_student_that_does_not_map_onto_qwen2_moe_is_refused_before_anything_is_written():
    from compressor.errors import ExportError
    from compressor.plugins.hf_moe import checkpoint_model

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**SIZES, attention_bias=True)
    ).eval()
    _upcycle(model, layers="all")
    with pytest.raises(ExportError, match=r"not in Qwen2-MoE: .*o_proj.bias"):
        checkpoint_model(model)


def _recipe(folder: Path, out: Path, passes: str, extra: str = "") -> str:
    return f"""\
name: tiny-moe
output: {out}
teacher: {{loader: hf, model: {folder}, task: causal-lm}}
student: {{from_teacher: true}}
module_passes:
{passes}data:
  loader: text
  kwargs: {{source: prose, task: language-modeling, max_length: 16, limit: 48}}
  batch_size: 4
  eval_batch_size: 8
losses:
  - {{name: kd, temperature: 1.0}}
  - {{name: moe_balance, z_loss: 0.001}}
train:
  steps: 3
  log_every: 1
  eval_every: 3
  checkpoint_every: 3
{extra}report: {{latency_batches: [2], latency_repeats: 1}}
"""


UPCYCLE = (
    "  - {name: moe_upcycle, experts: 4, top_k: 2, layers: every_other, router_init: calibration}\n"
)


@pytest.mark.parametrize(
    "family",  # CI's optimum environment reruns one family
    [pytest.param(f, marks=pytest.mark.optimum) if f == "llama" else f for f in sorted(FAMILIES)],
)
def test_an_upcycled_decoder_trains_and_exports_a_checkpoint_and_onnx_folder(
    family, tmp_path, registry
):
    folder = save_hf_folder(tmp_path, family, _decoder(family))
    text = (
        _recipe(folder, tmp_path / "run", UPCYCLE).replace(
            "train:\n", 'train:\n  trainable: ["*.mlp.*"]\n'
        )
        + "export:\n  - {name: hf}\n"
    ).replace("report: {", "report: {export_teacher: false, ")  # the dense teacher: elsewhere
    recipe = load_recipe(_write(tmp_path, text))
    plan = build_plan(recipe, registry)
    trained = {id(p) for p in plan.trainable_parameters()}
    named = dict(plan.student.named_parameters())
    assert trained == {id(p) for n, p in named.items() if ".mlp." in n}
    assert any("of" in n and "student parameters are trained" in n for n in plan.notes)
    summary = run(recipe, registry, progress=False)
    history = summary.report["history"]
    balance = [r["moe_balance"] / 0.01 for r in history if "moe_balance" in r]  # its weight
    assert balance and all(0.9 < b < 2.0 for b in balance)  # E * sum f P is 1 when balanced
    (export,) = summary.exports
    assert export.ok, export.details
    assert export.details["onnxruntime_max_abs_diff"] < 1e-4
    assert export.details["greedy_tokens_equal"] == "32 of 32"
    optimum_checked(export.details)  # where installed: optimum generates the same tokens
    out = Path(export.details["folder"])
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_moe"
    # the checkpoint gives the outputs onnxruntime gives (which the exporter checked against
    # the student graph), and where optimum is installed, so does its loader
    ids = torch.randint(0, 1000, (1, 7))
    mask = torch.ones_like(ids)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    got = torch.from_numpy(OrtDecoder(out / "model.onnx").prompt_logits(ids, mask))
    torch.testing.assert_close(_logits(back, ids), got, atol=1e-4, rtol=1e-4)
    if OPTIMUM:
        from optimum.onnxruntime import ORTModelForCausalLM

        ort = ORTModelForCausalLM.from_pretrained(out)
        got = torch.as_tensor(np.asarray(ort(input_ids=ids, attention_mask=mask).logits))
        torch.testing.assert_close(_logits(back, ids), got, atol=1e-4, rtol=1e-4)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "passes, where, message",
    [
        (
            "  - {name: moe_upcycle, experts: 2, top_k: 3}\n",
            "module_passes.0",
            "top_k 3 is more than the 2 experts",
        ),
        (
            "  - {name: moe_upcycle, layers: [1, 7]}\n",
            "module_passes.0",
            "layer 7 is not a layer of the model, which has 4",
        ),
        (
            "  - {name: moe_upcycle, experts: 3, init: split}\n",
            "module_passes.0",
            "partitions the 64 intermediate channels of model.layers.1.mlp among 3 experts",
        ),
    ],
)
def test_bad_upcycling_options_are_located_recipe_errors(
    passes, where, message, tmp_path, registry
):
    folder = save_hf_folder(tmp_path, "llama", _decoder())
    recipe = load_recipe(_write(tmp_path, _recipe(folder, tmp_path / "run", passes)))
    with pytest.raises((RecipeError, RecipeErrors)) as info:
        build_plan(recipe, registry)
    text = str(info.value)
    assert message in text and "recipe.yaml:" in text, text


def test_a_trainable_pattern_that_matches_nothing_is_located(tmp_path, registry):
    folder = save_hf_folder(tmp_path, "llama", _decoder())
    text = _recipe(folder, tmp_path / "run", UPCYCLE).replace(
        "train:\n", 'train:\n  trainable: ["*.mlp.*", "*.experts_typo.*"]\n'
    )
    recipe = load_recipe(_write(tmp_path, text))
    with pytest.raises(RecipeError, match=r"pattern '\*\.experts_typo\.\*' matches no student"):
        build_plan(recipe, registry)


def test_a_block_without_a_known_ffn_is_named_with_its_parts():
    config = transformers.DistilBertConfig(
        vocab_size=100, dim=16, n_layers=2, n_heads=2, hidden_dim=32
    )
    module = HFModule(transformers.DistilBertModel(config), "feature-extraction")
    with pytest.raises(ValueError, match=r"layer 1 \(transformer.layer.1\) has no FFN.*ffn"):
        MoEUpcycle(MoEUpcycleOptions())(module, ModulePassContext("student", None))


@pytest.mark.parametrize(
    "passes",
    [
        "  - {name: moe_upcycle, experts: 4, top_k: 2, layers: every_other, init: copy}\n",
        "  []\n",
    ],
    ids=["copy-upcycled", "plain-copy"],
)
def test_a_student_equal_to_its_teacher_trains_to_the_end_with_the_guard_on(
    passes, tmp_path, registry
):
    # its KD loss starts near 0 and climbs by large ratios: not divergence
    folder = save_hf_folder(tmp_path, "llama", _decoder())
    text = _recipe(folder, tmp_path / "run", passes).replace("steps: 3", "steps: 6")
    text = text.replace("  - {name: moe_balance, z_loss: 0.001}\n", "")
    recipe = load_recipe(
        _write(tmp_path, text.replace("module_passes:\n  []", "module_passes: []"))
    )
    assert recipe.train.divergence is not None and recipe.train.divergence.factor == 100
    summary = run(recipe, registry, progress=False)
    losses = [r["loss"] for r in summary.report["history"] if "loss" in r]
    assert summary.report["steps"] == 6 and len(losses) == 6
    assert abs(losses[0]) < 1e-5 and max(losses[1:]) > 100 * abs(losses[0])  # the climb


HF_MOE = {  # Hugging Face's own MoE families, in their sparse (dispatching) form
    "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(
        transformers.Qwen2MoeConfig(
            **SIZES,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            mlp_only_layers=[0],
        )
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(
        transformers.Qwen3MoeConfig(
            **SIZES, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8
        )
    ),
    "mixtral": lambda: transformers.MixtralForCausalLM(
        transformers.MixtralConfig(**SIZES, num_local_experts=4, num_experts_per_tok=2)
    ),
}


@pytest.mark.parametrize("family", sorted(HF_MOE))
def test_a_hugging_face_moe_teacher_and_its_copy_distil_and_export_with_target_both(
    family, tmp_path, registry
):
    torch.manual_seed(0)
    folder = save_hf_folder(tmp_path, family, HF_MOE[family]().eval())
    routing = "  - {name: moe_routing, target: both}\n"
    text = _recipe(folder, tmp_path / "run", routing) + "export:\n  - {name: hf}\n"
    if family != "qwen2_moe":  # the student is the teacher's copy: its folder is the same
        text = text.replace("report: {", "report: {export_teacher: false, ")  # save path
    summary = run(load_recipe(_write(tmp_path, text)), registry, progress=False)
    notes = summary.report["pass_notes"]
    for role in ("teacher", "student"):
        assert any(n.startswith(f"{role}: moe_routing:") for n in notes), notes
    (export,) = summary.exports
    assert export.ok and export.details["greedy_tokens_equal"] == "32 of 32", export.details


def test_sparse_moe_blocks_left_for_capture_are_located_with_the_fix(tmp_path, registry):
    folder = save_hf_folder(tmp_path, "qwen2_moe", _tiny_qwen2_moe())
    routing = "  - {name: moe_routing, target: teacher}\n"  # the copy keeps its sparse blocks
    recipe = load_recipe(_write(tmp_path, _recipe(folder, tmp_path / "run", routing)))
    with pytest.raises((RecipeError, RecipeErrors)) as info:
        build_plan(recipe, registry)
    text = str(info.value)
    assert "(student): the student has 3 Hugging Face sparse MoE block(s)" in text
    assert "Qwen2MoeSparseMoeBlock at model.layers.1.mlp" in text
    assert "{name: moe_routing, target: both}" in text
