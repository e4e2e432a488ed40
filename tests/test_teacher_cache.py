"""teacher_cache: the frozen teacher's values computed once per training sample, read back by
later epochs (whole, or as top-k sparse targets for kd), saved with checkpoints for resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST_RECIPE, tiny_llama_folder

from compressor import hookimpl
from compressor.cuda import reference
from compressor.cuda.sparse import sparse_divergence, top_k_targets
from compressor.engine import train
from compressor.errors import CompressorError
from compressor.metrics import read_metrics
from compressor.pipeline import run
from compressor.plan import build_plan
from compressor.recipe_file import load_recipe
from compressor.registry import Registry
from compressor.teacher_cache import CacheLayout, TeacherCache

transformers = pytest.importorskip("transformers")


# -- sparse targets ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", reference.DIVERGENCES)
@pytest.mark.parametrize("head", [False, True])
def test_sparse_targets_keeping_every_class_are_the_dense_divergence(kind, head):
    torch.manual_seed(0)
    n, vocab, width = 14, 40, 6
    mask = torch.rand(n) > 0.3
    hidden = torch.randn(n, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    teacher = torch.randn(n, width) @ torch.randn(vocab, width).T
    student = F.linear(hidden, weight) if not head else hidden
    options: dict[str, Any] = dict(kind=kind, beta=0.3, temperature=2.0, t2_scale=True, mask=mask)
    targets = top_k_targets(teacher, vocab, 2.0)
    # chunks of 3 rows: the chunking and the recomputed logits are what is tested
    got = sparse_divergence(
        student, targets, **options, weight=weight if head else None, memory_budget=3 * vocab * 24
    )
    want = reference.divergence(F.linear(hidden, weight), teacher, **options)
    torch.testing.assert_close(got, want)
    for g, w in zip(
        torch.autograd.grad(got, [hidden, weight]),
        torch.autograd.grad(want, [hidden, weight]),
        strict=True,
    ):
        torch.testing.assert_close(g, w)


def _buckets_by_autograd(student, targets, kind, temperature, mask):
    """The k + 1 bucket divergence written plainly, differentiated by autograd: the oracle
    for the closed-form gradient."""
    log_q = F.log_softmax(student / temperature, -1)
    kept = log_q.gather(-1, targets.classes)
    tail = torch.logsumexp(log_q.scatter(-1, targets.classes, float("-inf")), -1, keepdim=True)
    target = torch.cat([targets.log_prob, targets.tail[..., None]], -1)
    rows = reference.divergence_rows(torch.cat([kept, tail], -1), target, kind, 0.3, 1.0)
    return (rows * mask).sum() / mask.sum() * temperature**2


@pytest.mark.parametrize("kind", reference.DIVERGENCES)
@pytest.mark.parametrize("head", [False, True])
def test_the_closed_form_gradient_of_few_kept_classes_is_autograds(kind, head):
    torch.manual_seed(2)
    n, vocab, width, k = 10, 30, 5, 4
    mask = (torch.rand(n) > 0.2).float()
    hidden = torch.randn(n, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    targets = top_k_targets(2 * torch.randn(n, vocab), k, 1.5)
    got = sparse_divergence(
        hidden if head else F.linear(hidden, weight),
        targets,
        kind=kind,
        beta=0.3,
        temperature=1.5,
        mask=mask.bool(),
        weight=weight if head else None,
        memory_budget=4 * vocab * 24,  # chunks of 4 rows
    )
    want = _buckets_by_autograd(F.linear(hidden, weight), targets, kind, 1.5, mask)
    torch.testing.assert_close(got, want)
    for g, w in zip(
        torch.autograd.grad(got, [hidden, weight]),
        torch.autograd.grad(want, [hidden, weight]),
        strict=True,
    ):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_fewer_kept_classes_never_raise_a_divergence(kind):
    torch.manual_seed(1)
    student, teacher = torch.randn(20, 50), 3 * torch.randn(20, 50)
    dense = reference.divergence(student, teacher, kind=kind, temperature=1.0)
    values = [
        float(sparse_divergence(student, top_k_targets(teacher, k, 1.0), kind=kind))
        for k in (1, 5, 20, 49)
    ]
    assert all(v <= float(dense) + 1e-5 for v in values)
    assert values[-1] == pytest.approx(float(dense), rel=0.05)  # one class left in the tail


def test_the_tail_holds_the_mass_of_the_other_classes():
    logits = torch.randn(3, 7, 30)
    targets = top_k_targets(logits, 4, 1.5)
    total = targets.log_prob.exp().sum(-1) + targets.tail.exp()
    torch.testing.assert_close(total, torch.ones(3, 7))
    assert targets.classes.shape == (3, 7, 4)
    assert torch.equal(targets.classes, (logits / 1.5).topk(4, dim=-1).indices)


# -- the cache ----------------------------------------------------------------------------------
def test_samples_read_back_at_another_batchs_token_length(tmp_path):
    cache = TeacherCache(CacheLayout({"h": (1,), "a": (2, 3)}), tmp_path / "cache")
    teacher = {"h": torch.randn(2, 5, 3), "a": torch.randn(2, 4, 5, 5)}
    x = {"input_ids": torch.zeros(2, 5, dtype=torch.long)}
    assert cache.lookup([7, 9], x, torch.device("cpu")) is None
    cache.store([7, 9], x, teacher)
    assert cache.lookup([7, 8], x, torch.device("cpu")) is None  # 8 is not kept
    shorter = cache.lookup([9, 7], {"input_ids": torch.zeros(2, 3, dtype=torch.long)}, "cpu")  # type: ignore[arg-type]
    assert shorter is not None
    torch.testing.assert_close(shorter["h"], teacher["h"][[1, 0], :3])
    torch.testing.assert_close(shorter["a"], teacher["a"][[1, 0], :, :3, :3])
    longer = cache.lookup([7], {"input_ids": torch.zeros(1, 6, dtype=torch.long)}, "cpu")  # type: ignore[arg-type]
    assert longer is not None and longer["h"].shape == (1, 6, 3)
    assert float(longer["h"][0, 5].abs().sum()) == 0  # padding past the sample's end

    cache.save(4)
    cache.store(
        [3],
        {"input_ids": torch.zeros(1, 5, dtype=torch.long)},
        {k: v[:1] for k, v in teacher.items()},
    )
    cache.save(8)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "part-00000004.safetensors",
        "part-00000008.safetensors",
    ]
    # a run resumed at step 4 keeps what was saved by then; step 8's part is redone
    again = TeacherCache(CacheLayout({"h": (1,), "a": (2, 3)}), tmp_path / "cache")
    again.load(4)
    assert sorted(again.samples) == [7, 9]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["part-00000004.safetensors"]
    torch.testing.assert_close(again.samples[9]["h"], teacher["h"][1])


# -- runs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("cache"))


def _recipe(
    tmp_path: Path, llama: Path, cache: str, kd: str = "{name: kd, fused_head: true}", extra=""
) -> Path:
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(f"""\
output: {path.with_suffix("")}
teacher: {{loader: hf, model: {llama}, task: causal-lm}}
student: {{from_teacher: true}}
module_passes: [{{name: student_layers, layers: [0, 2]}}]
data:
  loader: text
  kwargs: {{source: prose, task: language-modeling, max_length: 24, limit: 40}}
  batch_size: 8
losses:
  - {kd}
{extra}teacher_cache: {cache}
train: {{steps: 12, log_every: 1, eval_every: 12, checkpoint_every: 6, optimizer: {{name: adamw, lr: 0.01}}}}
export: []
report: {{latency_batches: [2], latency_repeats: 1}}
""")
    return path


def _losses(history: list[dict[str, Any]]) -> list[float]:
    return [r["loss"] for r in history if "loss" in r]


def test_a_cached_teacher_trains_exactly_as_the_live_one(llama, tmp_path, registry):
    """39 samples in batches of 8: the third epoch's steps read every sample from the cache."""
    live = run(load_recipe(_recipe(tmp_path, llama, "null")), registry, progress=False)
    cached = run(load_recipe(_recipe(tmp_path, llama, "{}")), registry, progress=False)
    assert _losses(cached.report["history"]) == _losses(live.report["history"])
    stats = cached.report["teacher_cache"]
    assert stats["cached_samples"] == 39 and stats["steps_from_cache"] == 4
    assert stats["steps_with_teacher"] == 8 and stats["speedup"] > 0
    assert "Teacher cache: 39 samples" in (cached.run_dir / "report.md").read_text()


@pytest.mark.parametrize("kd", ["{name: kd, fused_head: true}", "{name: kd, temperature: 2.0}"])
def test_top_k_targets_are_the_same_loss_cached_or_not(llama, tmp_path, registry, kd):
    cached = run(load_recipe(_recipe(tmp_path, llama, "{top_k: 8}", kd)), registry, progress=False)
    # a budget too small for one sample: every step computes the sparse targets anew
    live = run(
        load_recipe(_recipe(tmp_path, llama, "{top_k: 8, memory_mb: 1.0e-6}", kd)),
        registry,
        progress=False,
    )
    assert cached.report["teacher_cache"]["steps_from_cache"] == 4
    assert live.report["teacher_cache"]["budget_reached"]
    assert live.report["teacher_cache"]["steps_from_cache"] == 0
    torch.testing.assert_close(
        _losses(cached.report["history"]), _losses(live.report["history"]), rtol=1e-5, atol=0
    )


class _StopAt:
    """A plugin that stops training when step `step` is logged, as a killed run would."""

    def __init__(self, step: int):
        self.step = step

    @hookimpl
    def compressor_metrics_logged(self, record: dict[str, Any], run_dir: Path) -> None:
        if record["step"] == self.step and "loss" in record:
            raise KeyboardInterrupt


@pytest.mark.parametrize("cache", ["{top_k: 8}", "{}"])  # sparse targets; the head's input
def test_a_resumed_run_reads_the_saved_cache(llama, tmp_path, registry, cache):
    recipe = load_recipe(_recipe(tmp_path, llama, cache))
    whole = train(build_plan(recipe, registry), tmp_path / "whole", progress=False)

    stopping = Registry.load()
    stopping.pm.register(_StopAt(9))
    with pytest.raises(KeyboardInterrupt):
        train(build_plan(recipe, stopping), tmp_path / "cut", progress=False)
    parts = sorted(p.name for p in (tmp_path / "cut" / "teacher_cache").iterdir())
    assert parts == ["part-00000006.safetensors"]  # the checkpoint at 6; 9 never saved
    resumed = train(build_plan(recipe, registry), tmp_path / "cut", resume=True, progress=False)
    assert _losses(read_metrics(tmp_path / "cut" / "metrics.jsonl")) == pytest.approx(
        _losses(whole.history), rel=1e-6
    )
    # the third epoch reads the first epoch's samples from the saved part, as the whole run did
    assert resumed.teacher_cache is not None and whole.teacher_cache is not None
    assert resumed.teacher_cache["steps_from_cache"] == whole.teacher_cache["steps_from_cache"] > 0


def test_a_changed_recipe_does_not_resume_on_a_stale_cache(llama, tmp_path, registry):
    recipe = load_recipe(_recipe(tmp_path, llama, "{top_k: 8}"))
    train(build_plan(recipe, registry), tmp_path / "run", progress=False)
    hotter = load_recipe(
        _recipe(tmp_path, llama, "{top_k: 8}", "{name: kd, fused_head: true, temperature: 3.0}")
    )
    cache = TeacherCache(
        build_plan(hotter, registry).cache_layout, tmp_path / "run" / "teacher_cache"
    )
    cache.load(12)
    assert not cache.samples and "dropped" in cache.stats.notes[0]
    assert not list((tmp_path / "run" / "teacher_cache").iterdir())


def test_a_baseline_beside_a_cached_teacher(write_recipe):
    """The baseline trains without a teacher, so without its cache; the distilled student
    reads its teacher's logits and feature tap from the cache after the first epoch."""
    text = FAST_RECIPE.replace("report:\n", "teacher_cache: {}\nreport:\n  baseline: true\n")
    summary = run(load_recipe(write_recipe(text)), Registry.load(), progress=False)
    assert summary.report["models"]["baseline"]["quality"]["accuracy"] > 0
    assert summary.report["teacher_cache"]["steps_from_cache"] > 0


def test_top_k_refuses_a_loss_that_would_lose_the_teachers_logits(llama, tmp_path, registry):
    both = "{name: kd}\n  - {name: embedding_mse}"  # the second reads the teacher's logits too
    with pytest.raises(CompressorError, match="keeps only as loss 'kd'"):
        build_plan(load_recipe(_recipe(tmp_path, llama, "{top_k: 8}", both)), registry)
    two = "{name: kd}\n  - {name: kd, temperature: 2.0, divergence: reverse_kl}"
    with pytest.raises(CompressorError, match="would each keep sparse targets"):
        build_plan(load_recipe(_recipe(tmp_path, llama, "{top_k: 8}", two)), registry)


def test_top_k_needs_a_loss_that_reads_sparse_targets(llama, tmp_path, registry):
    kd = '{name: hidden_mse, student: "model.layers.{}", teacher: "model.layers.{}", layer_map: {0: 0}}'
    with pytest.raises(CompressorError, match="no loss here reads them so"):
        build_plan(load_recipe(_recipe(tmp_path, llama, "{top_k: 8}", kd)), registry)
