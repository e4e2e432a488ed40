"""The cached decoder written from the student graph: the cache rewrite against the model's
own cache in PyTorch (families, grouped heads, sliding windows, padding), and a graph pass
that changes the student's maths found in onnxruntime's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_folder

from compressor.api import GraphPass, NoOptions, PassResult, hookimpl, node_module_path
from compressor.capture import capture_module
from compressor.errors import ExportError, RecipeError, RecipeErrors
from compressor.pipeline import run
from compressor.plan import build_plan
from compressor.plugins.hf import HFModule
from compressor.plugins.kv_cache import with_kv_cache
from compressor.plugins.ort_decoder import OrtDecoder
from compressor.recipe_file import load_recipe
from compressor.registry import Registry

transformers = pytest.importorskip("transformers")
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)


def _graph(model, attn="eager"):
    model.config._attn_implementation = attn
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return capture_module(HFModule(model.eval(), "causal-lm"), (x,), "student", "export")


def _stepwise(graph, layout, ids, mask, split):
    """Logits of `ids` fed as a prompt of `split` tokens, then one token at a time."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    empty = torch.zeros(ids.shape[0], layout.kv_heads, 0, layout.head_dim)
    cache = [empty] * (2 * layout.layers)
    out = graph(ids[:, :split], mask[:, :split], positions[:, :split], *cache)
    logits = [out[0]]
    for t in range(split, ids.shape[1]):
        out = graph(ids[:, t : t + 1], mask[:, : t + 1], positions[:, t : t + 1], *out[1:])
        logits.append(out[0])
    return torch.cat(logits, dim=1)


MODELS = {
    "llama-grouped": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**SIZES, intermediate_size=64, num_key_value_heads=2)
    ),
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4)
    ),
    # every layer attends to its last 3 tokens only
    "mistral-window-3": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(
            **SIZES, intermediate_size=64, num_key_value_heads=2, sliding_window=3
        )
    ),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("repeat_heads", [False, True])
def test_the_cached_graph_gives_the_models_own_logits_step_by_step(name, repeat_heads):
    """Prompt then token by token, with a padded row: the model's logits from one pass over
    the whole sequence (its own mask; positions counted as generate() does), at every real
    token."""
    from compressor.plugins.hf_decoder import attention_windows

    torch.manual_seed(0)
    model = MODELS[name]().eval()
    graph = _graph(model)
    cached, layout = with_kv_cache(graph, attention_windows(model.config), repeat_heads)
    grouped = getattr(model.config, "num_key_value_heads", 4)
    assert layout.layers == 2 and layout.kv_heads == (4 if repeat_heads else grouped)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # the first row's prompt is 2 tokens shorter, padded on the left
    with torch.no_grad():
        got = _stepwise(cached, layout, ids, mask, split=5)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() counts them
        want = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_the_window_matters_where_the_sequence_is_longer_than_it():
    """A cached graph given no window attends to everything: different logits past 3 tokens
    (so the test above would fail if windows were dropped)."""
    torch.manual_seed(0)
    model = MODELS["mistral-window-3"]().eval()
    cached, layout = with_kv_cache(_graph(model))
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = _stepwise(cached, layout, ids, torch.ones_like(ids), split=2)
        want = model(input_ids=ids).logits
    torch.testing.assert_close(got[:, :3], want[:, :3], atol=1e-5, rtol=1e-5)
    assert float((got[:, 4:] - want[:, 4:]).abs().max()) > 1e-3


def test_a_graph_without_eager_attention_is_refused_with_what_it_needs():
    torch.manual_seed(0)
    model = MODELS["llama-grouped"]()
    with pytest.raises(ExportError, match="Hugging Face's eager attention"):
        with_kv_cache(_graph(model, attn="sdpa"))


class HalveLastMLP(GraphPass[NoOptions]):
    """Halves the output of the student's last MLP: a change of its maths that only the
    graph has (the saved Hugging Face weights know nothing of it)."""

    name = "halve_last_mlp"

    def __call__(self, gm, context):
        if context.role != "student":
            return PassResult(gm, False)
        mlp = [n for n in gm.graph.nodes if node_module_path(n).endswith("mlp.down_proj")]
        last = mlp[-1]
        with gm.graph.inserting_after(last):
            half = gm.graph.call_function(torch.ops.aten.mul.Tensor, (last, 0.5))
        last.replace_all_uses_with(half)
        half.args = (last, 0.5)
        gm.recompile()
        return PassResult(gm, True)


class HalvePlugin:
    @hookimpl
    def compressor_graph_passes(self):
        return [HalveLastMLP]


def _llama_recipe(tmp_path: Path, teacher_extra: str = "", extra: str = "") -> Path:
    """A 2-step KD run of a tiny Llama into its copy, exported with `hf`."""
    teacher = tiny_llama_folder(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""\
output: {tmp_path / "run"}
teacher: {{loader: hf, model: {teacher}, task: causal-lm{teacher_extra}}}
student: {{from_teacher: true}}
data:
  loader: text
  kwargs: {{source: prose, task: language-modeling, max_length: 24, limit: 40}}
  batch_size: 4
losses: [{{name: kd}}]
train: {{steps: 2}}
export: [{{name: hf}}]
report: {{latency_batches: [2], latency_repeats: 1, export_teacher: false}}
{extra}""")
    return recipe


def test_a_graph_pass_that_changes_the_students_maths_is_in_the_exported_decoder(tmp_path):
    recipe = _llama_recipe(tmp_path, extra="passes: [{name: halve_last_mlp}]\n")
    summary = run(load_recipe(recipe), Registry.load(extra=(HalvePlugin(),)), progress=False)
    (export,) = summary.exports
    assert export.ok and export.details["greedy_tokens_equal"] == "32 of 32", export.details
    folder = Path(export.details["folder"])
    saved = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(5, 30000, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    got = torch.from_numpy(OrtDecoder(folder / "model.onnx").prompt_logits(ids, mask))
    with torch.no_grad():
        plain = saved(input_ids=ids, attention_mask=mask).logits
        hook = saved.model.layers[-1].mlp.down_proj.register_forward_hook(
            lambda module, args, out: out * 0.5
        )
        halved = saved(input_ids=ids, attention_mask=mask).logits
        hook.remove()
    assert float((got - plain).abs().max()) > 1e-3  # the pass is in onnxruntime's logits...
    torch.testing.assert_close(got, halved, atol=1e-4, rtol=1e-4)  # ...and nothing else


def test_a_decoder_loaded_with_sdpa_attention_is_refused_before_training(tmp_path, registry):
    recipe = _llama_recipe(tmp_path, ", kwargs: {attn_implementation: sdpa}")
    with pytest.raises((RecipeError, RecipeErrors)) as info:
        build_plan(load_recipe(recipe), registry)
    message = str(info.value)
    assert "(export[0].name): exporter 'hf' writes a causal LM's cached decoder" in message
    assert "attn_implementation 'sdpa'" in message
    assert not (tmp_path / "run").exists()
