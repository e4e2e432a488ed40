"""Data-parallel runs under torchrun (gloo, 2 CPU processes): the same loss curve as one
process of the same global batch, one writer, sharded teachers, and checkpoints that resume at
another world size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    DIGITS,
    FAST_RECIPE,
    TESTS,
    run_compress,
    save_hf_folder,
    tiny_llama_folder,
)

from compressor.checkpoint import latest_checkpoint
from compressor.distributed import World, is_distributed_checkpoint
from compressor.errors import RecipeError
from compressor.loading import IGNORE
from compressor.losses import LossInputs
from compressor.metrics import read_metrics
from compressor.pipeline import run
from compressor.plan import build_plan
from compressor.recipe_file import load_recipe

# relative tolerance between curves of different world sizes: the sums over ranks and
# micro-batches are the same sums in another order (measured: ~2e-7 on digits, 2e-6 on the
# tiny BERT)
CURVE_RTOL = 1e-5
DIGITS_SHORT = [
    "train.steps=40",
    "train.log_every=1",
    "train.eval_every=20",
    "train.checkpoint_every=20",
    "report.baseline=false",
    "--quiet",
]


def _curve(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def _evals(run_dir: Path) -> list[dict[str, float]]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval/accuracy" in r]


def _assert_same_curve(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> None:
    assert [s for s, _ in a] == [s for s, _ in b]  # every step once: one writer
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert y == pytest.approx(x, rel=CURVE_RTOL)


def _compress(*args: str, fault: str = "") -> tuple[int, str]:
    done = run_compress(
        *(("-p", "fault_injection") if fault else ()),
        *args,
        path=(TESTS,),
        env={"COMPRESSOR_FAULT": fault} if fault else {},
    )
    return done.returncode, done.stderr + done.stdout


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "one"
    rc, log = _compress(str(DIGITS / "recipe.yaml"), f"output={out}", *DIGITS_SHORT)
    assert rc == 0, log[-3000:]
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_the_digits_recipe_on_two_ranks_follows_the_one_process_curve(
    one_process, tmp_path, strategy
):
    out = tmp_path / strategy
    rc, log = _compress(
        str(DIGITS / "recipe.yaml"),
        f"output={out}",
        *DIGITS_SHORT,
        f"train.distributed.strategy={strategy}",
        "--nproc",
        "2",
    )
    assert rc == 0, log[-3000:]
    _assert_same_curve(_curve(one_process), _curve(out))
    # sharded evaluation, reduced: the same metrics as one process scoring everything
    for a, b in zip(_evals(one_process), _evals(out), strict=True):
        assert b["eval/accuracy"] == a["eval/accuracy"]
        assert b["eval/loss"] == pytest.approx(a["eval/loss"], rel=1e-5)
    report = json.loads((out / "report.json").read_text())
    assert all(e["ok"] for e in report["exports"])  # rank 0 exported the whole student
    checkpoint = latest_checkpoint(out / "checkpoints")
    assert checkpoint is not None and is_distributed_checkpoint(checkpoint.path)
    assert len(list(checkpoint.path.glob("*.distcp"))) == 2  # one file of shards per rank
    if strategy == "fsdp":  # the digits teacher has 227,018 parameters
        assert "each rank holds 113,509 of the teacher's 227,018 parameters (50.0%" in log


def test_an_encoder_on_two_ranks_weights_tokens_like_one_process(tmp_path):
    """Token-level losses over texts of different lengths: each rank's share of the global
    token count weights its terms. A tiny BERT without dropout, so both runs draw nothing
    at random."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    folder = save_hf_folder(tmp_path, "bert", transformers.BertModel(config))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""\
teacher: {{loader: hf, model: {folder}, task: feature-extraction}}
student: {{from_teacher: true}}
module_passes: [{{name: student_layers, layers: [0, 3]}}]
data:
  loader: text
  kwargs: {{source: prose, task: embedding, max_length: 48, limit: 300}}
  batch_size: 16
  group_by_length: true
  eval_batch_size: 32
losses:
  - {{name: embedding_cosine}}
  - {{name: hidden_mse, student: "encoder.layer.{{}}", teacher: "encoder.layer.{{}}",
      student_depth: 2, teacher_depth: 4, weight: 10.0}}
train: {{steps: 4, log_every: 1, eval_every: 4, checkpoint_every: 4}}
export: []
""")
    rc, log = _compress(str(recipe), f"output={tmp_path / 'one'}", "--quiet")
    assert rc == 0, log[-3000:]
    rc, log = _compress(str(recipe), f"output={tmp_path / 'two'}", "--quiet", "--nproc", "2")
    assert rc == 0, log[-3000:]
    _assert_same_curve(_curve(tmp_path / "one"), _curve(tmp_path / "two"))
    one, two = (
        [r for r in read_metrics(tmp_path / n / "metrics.jsonl") if "eval/spearman" in r]
        for n in ("one", "two")
    )
    assert two[-1]["eval/spearman"] == pytest.approx(one[-1]["eval/spearman"], abs=1e-5)


def test_fsdp_keeps_the_heads_a_fused_kd_reads_whole(tmp_path):
    """The fused head's loss reads both lm_head weights from the graphs: the teacher's stays
    unsharded (tied here: the embedding too), the student's gathered until its backward."""
    folder = tiny_llama_folder(tmp_path, tied=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""\
teacher: {{loader: hf, model: {folder}, task: causal-lm}}
student: {{from_teacher: true}}
module_passes: [{{name: student_layers, layers: [0, 2]}}]
data:
  loader: text
  kwargs: {{source: prose, task: language-modeling, max_length: 24, limit: 80}}
  batch_size: 4
losses: [{{name: kd, fused_head: true}}]
train: {{steps: 4, log_every: 1, eval_every: 4, checkpoint_every: 4}}
export: [{{name: hf}}]
report: {{latency_batches: [1], latency_repeats: 1, export_teacher: false}}
""")
    # the export is checked once, on the two-rank run
    rc, log = _compress(str(recipe), f"output={tmp_path / 'one'}", "export=[]", "--quiet")
    assert rc == 0, log[-3000:]
    two = tmp_path / "two"
    rc, log = _compress(
        str(recipe),
        f"output={two}",
        "train.distributed.strategy=fsdp",
        "--quiet",
        "--nproc",
        "2",
    )
    assert rc == 0, log[-3000:]
    # the tied embedding (976,704 of 1,004,576) stays whole, the rest is halved
    assert "each rank holds 990,640 of the teacher's 1,004,576 parameters" in log
    one_curve, two_curve = _curve(tmp_path / "one"), _curve(two)
    # step 1 is the same sum in another order; Adam on a loss this small (~6e-4) then
    # magnifies rounding, so later steps are compared loosely
    assert two_curve[0][1] == pytest.approx(one_curve[0][1], rel=CURVE_RTOL)
    for (_, a), (_, b) in zip(one_curve, two_curve, strict=True):
        assert b == pytest.approx(a, rel=1e-2)
    assert json.loads((two / "report.json").read_text())["exports"][0]["ok"]


@pytest.fixture
def fast(tmp_path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(FAST_RECIPE.replace("log_every: 5", "log_every: 1"))
    return path


def test_a_killed_rank_ends_the_run_and_one_process_resumes_it(fast, tmp_path):
    whole = tmp_path / "whole"
    rc, log = _compress(str(fast), f"output={whole}", "--quiet")
    assert rc == 0, log[-3000:]
    killed = tmp_path / "killed"
    rc, log = _compress(
        str(fast), f"output={killed}", "--quiet", "--nproc", "2", fault="kill_rank_at_step:1:25"
    )
    assert rc != 0
    assert "rank      : 1" in log and "SIGKILL" in log  # torchrun names the rank that died
    assert "continue with --resume" in log
    last = latest_checkpoint(killed / "checkpoints")
    assert last is not None and last.step == 20 and is_distributed_checkpoint(last.path)
    rc, log = _compress(str(fast), f"output={killed}", "--quiet", "--resume")  # one process
    assert rc == 0, log[-3000:]
    _assert_same_curve(_curve(whole), _curve(killed))


def test_a_one_process_checkpoint_resumes_on_two_sharded_ranks(fast, tmp_path):
    whole = tmp_path / "whole"
    rc, log = _compress(str(fast), f"output={whole}", "--quiet")
    assert rc == 0, log[-3000:]
    run_dir = tmp_path / "run"
    rc, _ = _compress(str(fast), f"output={run_dir}", "--quiet", fault="kill_at_step:15")
    assert rc == -9
    rc, log = _compress(
        str(fast),
        f"output={run_dir}",
        "train.distributed.strategy=fsdp",
        "--quiet",
        "--resume",
        "--nproc",
        "2",
    )
    assert rc == 0, log[-3000:]
    _assert_same_curve(_curve(whole), _curve(run_dir))


def test_grad_accum_splits_a_step_without_changing_it(write_recipe, tmp_path, registry):
    curves = []
    for accum in (1, 4):
        recipe = load_recipe(
            write_recipe(), [f"train.grad_accum={accum}", f"output={tmp_path / str(accum)}"]
        )
        run(recipe, registry, progress=False)
        curves.append(_curve(tmp_path / str(accum)))
    _assert_same_curve(*curves)


def test_a_batch_too_small_to_split_is_a_located_error(write_recipe, registry):
    recipe = load_recipe(write_recipe(), ["train.grad_accum=64"])
    with pytest.raises(RecipeError, match=r"grad_accum.*cannot be split into 64 micro-batches"):
        run(recipe, registry, progress=False)


def test_teacher_cache_is_refused_under_torchrun(write_recipe, registry, monkeypatch):
    recipe = load_recipe(write_recipe(), ["teacher_cache={}"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match="not available under torchrun"):
        build_plan(recipe, registry)


def test_token_terms_count_the_tokens_they_score(registry):
    """LossTerm.units: what the engine weights a rank's or micro-batch's terms by."""
    kd = registry.create("loss", "kd", {})
    kd.setup({"output": (2, 4, 10)}, {"output": (2, 4, 10)})
    ce = registry.create("loss", "ce", {})
    labels = torch.tensor([[5, 6, IGNORE, IGNORE], [1, 2, 3, 4]])
    batch = {"input_ids": labels.clamp(min=0), "attention_mask": (labels != IGNORE).long()}
    # next tokens scored: 1 in the first row (6), 3 in the second
    assert float(kd.units(batch, labels)) == 4 and float(ce.units(batch, labels)) == 4
    logits = torch.randn(2, 4, 10)
    inputs = LossInputs({"output": logits}, {"output": torch.randn(2, 4, 10)}, labels, batch)
    assert torch.isfinite(kd(inputs))
    classifier = registry.create("loss", "kd", {})
    classifier.setup({"output": (8, 10)}, {"output": (8, 10)})
    assert float(classifier.units(torch.zeros(8, 3), torch.zeros(8, dtype=torch.long))) == 8


def test_a_world_slices_a_batch_into_contiguous_parts():
    batch = torch.arange(7)
    parts = [World(rank, 2).slice(batch).tolist() for rank in range(2)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6]]
    assert World(1, 3).mine(list(range(7))) == [1, 4]
