"""prune_ffn: narrower feed-forward networks, the neurons that write the most kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import optimum_checked, save_hf_folder
from pydantic import ValidationError

from compressor.module_pass import ModulePassContext
from compressor.passes.prune_ffn import PruneFFN, PruneFFNOptions, feed_forward
from compressor.pipeline import run
from compressor.plan import build_plan
from compressor.plugins.hf import HFModule, decoder_layers
from compressor.recipe_file import load_recipe


class _Batches:
    """Training batches for the pass's calibration (the DataBundle interface it reads)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]):
        self.batches = batches
        self.train = [None] * sum(len(b["input_ids"]) for b in batches)

    def batch(self, split, indices, device):
        return self.batches[indices[0] // len(self.batches[0]["input_ids"])], None


def _module(family: str) -> HFModule:
    torch.manual_seed(0)
    common = dict(
        vocab_size=500, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64,
    )  # fmt: skip
    if family == "bert":
        return HFModule(
            transformers.BertModel(transformers.BertConfig(**common)), "feature-extraction"
        )
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **common))
    return HFModule(model, "causal-lm")


def _context(batch_size: int = 4) -> ModulePassContext:
    torch.manual_seed(1)
    batches = []
    for _ in range(2):
        mask = torch.ones(batch_size, 10)
        mask[1, 6:] = 0  # padding must not count
        batches.append(
            {"input_ids": torch.randint(5, 500, (batch_size, 10)), "attention_mask": mask}
        )
    return ModulePassContext("student", None, _Batches(batches), batch_size)  # type: ignore[arg-type]


def _outputs(module: HFModule, context: ModulePassContext) -> list[torch.Tensor]:
    with torch.no_grad():
        return [module.eval()(**x) for x in context.data.batches]  # type: ignore[union-attr]


def _silence(module: HFModule, neurons: list[int]) -> None:
    """Make these neurons of every block write nothing: their input rows are zeroed."""
    with torch.no_grad():
        for i, block in enumerate(decoder_layers(module.hf_model)[1]):
            for up in feed_forward(str(i), block, 32, 64).ups:
                up.weight[neurons] = 0
                if up.bias is not None:
                    up.bias[neurons] = 0


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_silent_neurons_go_first_and_the_outputs_do_not_change(family):
    module = _module(family)
    silent = [3, 17, 40, 41, 63]
    _silence(module, silent)
    context = _context()
    before = _outputs(module, context)
    pruned = PruneFFN(PruneFFNOptions(intermediate_size=64 - len(silent)))(module, context)
    assert pruned.config.intermediate_size == 59
    for i, block in enumerate(decoder_layers(pruned.hf_model)[1]):
        ffn = feed_forward(str(i), block, 32, 59)
        assert ffn.down.weight.shape == (32, 59) and all(
            u.weight.shape == (59, 32) for u in ffn.ups
        )
    for got, want in zip(_outputs(pruned, context), before, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (note,) = context.notes
    assert "kept 59 of 64 feed-forward neurons in each of 3 blocks" in note


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_the_pruned_model_is_the_original_without_the_dropped_neurons(family, tmp_path):
    """A random model, 3/4 of its neurons kept: the same outputs as the original whose dropped
    neurons are silenced, and the highest-scoring ones are kept; saved, it reloads with
    transformers' own class."""
    original, module = _module(family), _module(family)
    context = _context()
    scores: list[torch.Tensor] = []  # mean |input of the down projection| x its column norms

    def record(down, args):
        mask = context.data.batches[len(scores) // 3 % 2]["attention_mask"].bool()  # type: ignore[union-attr]
        scores.append(args[0].abs()[mask].sum(0) / mask.sum() * down.weight.norm(dim=0))

    blocks = decoder_layers(original.hf_model)[1]
    downs = [feed_forward(str(i), b, 32, 64).down for i, b in enumerate(blocks)]
    handles = [d.register_forward_pre_hook(record) for d in downs]
    _outputs(original, context)
    for h in handles:
        h.remove()
    weights = [len(b["input_ids"][b["attention_mask"].bool()]) for b in context.data.batches]  # type: ignore[union-attr]
    pruned = PruneFFN(PruneFFNOptions(keep=0.75))(module, context)
    assert pruned.config.intermediate_size == 48
    for i in range(3):  # block i's score: the token-weighted mean over the two batches
        score = (scores[i] * weights[0] + scores[3 + i] * weights[1]) / sum(weights)
        kept = score.topk(48).indices.sort().values
        dropped = sorted(set(range(64)) - set(kept.tolist()))
        ffn = feed_forward(str(i), decoder_layers(pruned.hf_model)[1][i], 32, 48)
        torch.testing.assert_close(ffn.down.weight, downs[i].weight[:, kept])
        with torch.no_grad():
            for up in feed_forward(str(i), blocks[i], 32, 64).ups:
                up.weight[dropped] = 0
                if up.bias is not None:
                    up.bias[dropped] = 0
    for got, want in zip(_outputs(pruned, context), _outputs(original, context), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    pruned.hf_model.save_pretrained(tmp_path)
    reloaded = type(pruned.hf_model).from_pretrained(tmp_path).eval()
    x = context.data.batches[0]  # type: ignore[union-attr]
    with torch.no_grad():
        torch.testing.assert_close(HFModule(reloaded, pruned.task)(**x), pruned(**x))


def test_models_without_one_dense_feed_forward_network_are_refused():
    with pytest.raises(ValueError, match="prune_ffn needs a Hugging Face model .*got Linear"):
        PruneFFN(PruneFFNOptions(keep=0.5))(torch.nn.Linear(2, 2), _context())
    gpt2 = transformers.GPT2Model(
        transformers.GPT2Config(vocab_size=500, n_embd=32, n_layer=2, n_head=4)
    )
    with pytest.raises(ValueError, match="GPT2Config has no intermediate_size"):
        PruneFFN(PruneFFNOptions(keep=0.5))(HFModule(gpt2, "feature-extraction"), _context())
    config = transformers.BertConfig(
        vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=32,
    )  # fmt: skip
    square = HFModule(transformers.BertModel(config), "feature-extraction")  # every layer 32 -> 32
    with pytest.raises(
        ValueError,
        match=r"block encoder\.layer\.0 has no single dense .*intermediate\.dense 32->32",
    ):
        PruneFFN(PruneFFNOptions(keep=0.5))(square, _context())


def test_options_take_one_size():
    with pytest.raises(ValidationError, match="exactly one of keep"):
        PruneFFNOptions(keep=0.5, intermediate_size=32)
    with pytest.raises(ValidationError, match="exactly one of keep"):
        PruneFFNOptions()
    with pytest.raises(ValueError, match="more than the model's 64 neurons"):
        PruneFFN(PruneFFNOptions(intermediate_size=65))(_module("bert"), _context())


def test_scores_need_training_text():
    with pytest.raises(
        ValueError, match="prune_ffn measures the model on the training data; there"
    ):
        PruneFFN(PruneFFNOptions(keep=0.5))(_module("bert"), ModulePassContext("student", None))


def test_a_recipe_run_exports_the_narrow_student(tmp_path, registry):
    """Through the pipeline: the note is in the plan, training runs, and the exported folder
    (config.intermediate_size from the pass) matches PyTorch in onnxruntime (and loads in
    optimum, where installed)."""
    torch.manual_seed(0)
    teacher = tmp_path / "bert"
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    save_hf_folder(tmp_path, "bert", transformers.BertModel(config))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""\
name: narrow
output: {tmp_path / "run"}
teacher: {{loader: hf, model: {teacher}, task: feature-extraction}}
student: {{from_teacher: true}}
module_passes:
  - {{name: prune_ffn, intermediate_size: 40}}
data:
  loader: text
  kwargs: {{source: prose, task: embedding, max_length: 32, limit: 96}}
  batch_size: 8
losses: [{{name: embedding_cosine}}]
train: {{steps: 4, optimizer: {{name: adamw, lr: 1.0e-3}}, eval_every: 4, checkpoint_every: 4}}
export: [{{name: hf}}]
report: {{latency_batches: [2], latency_repeats: 1, export_teacher: false, latency_tokens: 16}}
""")
    plan = build_plan(load_recipe(recipe), registry)
    assert any("prune_ffn kept 40 of 64" in note for note in plan.notes)
    summary = run(load_recipe(recipe), registry, progress=False)
    (export,) = summary.exports
    assert export.ok and export.details["onnxruntime_max_abs_diff"] <= 1e-4
    if optimum_checked(export.details):
        assert export.details["optimum_max_abs_diff"] <= 1e-4
    saved = json.loads((Path(export.details["folder"]) / "config.json").read_text())
    assert saved["intermediate_size"] == 40
