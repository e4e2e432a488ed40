from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAST_RECIPE
from pydantic import BaseModel

from compressor import hookimpl
from compressor.engine import batch_indices, train
from compressor.errors import TrainingStopped
from compressor.losses import LossTerm
from compressor.metrics import read_metrics
from compressor.plan import build_plan
from compressor.recipe_file import load_recipe
from compressor.registry import Registry


class _Killed(BaseException):
    """Stands in for the process dying: nothing in the engine catches it."""


class KillAt:
    def __init__(self, step: int):
        self.step = step

    @hookimpl
    def compressor_metrics_logged(self, record, run_dir):
        if record["step"] >= self.step:
            raise _Killed


def _losses(history):
    return [(r["step"], r["loss"]) for r in history if "loss" in r]


def test_batches_are_a_pure_function_of_seed_and_step():
    a = [batch_indices(s, 100, 32, seed=3) for s in range(10)]
    b = [batch_indices(s, 100, 32, seed=3) for s in range(10)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    epoch = torch.cat(a[:3])  # 3 batches of 32 per epoch of 100
    assert len(set(epoch.tolist())) == 96
    assert not torch.equal(a[0], batch_indices(0, 100, 32, seed=4))


def test_length_grouped_batches_pad_little_and_cover_the_epoch():
    lengths = torch.randint(5, 120, (1000,), generator=torch.Generator().manual_seed(0))

    def epoch(seed: int, number: int, grouped: bool) -> list[torch.Tensor]:
        return [
            batch_indices(s, 1000, 16, seed, lengths if grouped else None)
            for s in range(62 * number, 62 * (number + 1))  # 62 batches of 16 per epoch
        ]

    def padded(batches: list[torch.Tensor]) -> int:
        return sum(int(lengths[b].max()) * len(b) for b in batches)

    grouped, shuffled = epoch(3, 0, True), epoch(3, 0, False)
    assert torch.cat(grouped).sort().values.equal(torch.cat(shuffled).sort().values)
    assert padded(grouped) < 0.7 * padded(shuffled)  # random lengths: about 1.7x less padding
    assert all(torch.equal(a, b) for a, b in zip(grouped, epoch(3, 0, True), strict=True))
    # long and short batches come in random order, and each epoch differently
    first_lengths = [int(lengths[b].max()) for b in grouped]
    assert first_lengths != sorted(first_lengths, reverse=True)
    assert not torch.equal(grouped[0], epoch(3, 1, True)[0])


def test_resume_follows_the_uninterrupted_loss_trajectory(write_recipe, tmp_path):
    path = write_recipe()
    full = train(build_plan(load_recipe(path), Registry.load()), tmp_path / "full", progress=False)

    killed_dir = tmp_path / "killed"
    with pytest.raises(_Killed):
        train(
            build_plan(load_recipe(path), Registry.load(extra=(KillAt(15),))),
            killed_dir,
            progress=False,
        )
    assert (killed_dir / "checkpoints" / "latest").read_text() == "step_0000010"
    assert max(r["step"] for r in read_metrics(killed_dir / "metrics.jsonl")) == 15

    resumed = train(
        build_plan(load_recipe(path), Registry.load()), killed_dir, resume=True, progress=False
    )
    steps = [r["step"] for r in resumed.history if "loss" in r]
    assert steps == sorted(set(steps)), "steps past the checkpoint were logged twice"
    expected, got = _losses(full.history), _losses(resumed.history)
    assert [s for s, _ in got] == [s for s, _ in expected]
    for (_, a), (_, b) in zip(expected, got, strict=True):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-7)
    assert resumed.final_eval == pytest.approx(full.final_eval, rel=1e-6)


class NanOptions(BaseModel):
    step: int


class NanAt(LossTerm):
    """Returns NaN from its `step`-th call on."""

    name = "nan_at"
    Options = NanOptions
    needs_teacher = False

    def __init__(self, options):
        super().__init__(options)
        self.calls = 0

    def forward(self, inputs):
        self.calls += 1
        out = inputs.student["output"].float().mean() * 0
        return out + (float("nan") if self.calls >= self.options.step else 0.0)


class NanPlugin:
    @hookimpl
    def compressor_losses(self):
        return [NanAt]


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
    write_recipe, tmp_path
):
    path = write_recipe(
        FAST_RECIPE.replace("losses:\n", "losses:\n  - name: nan_at\n    step: 13\n")
    )
    plan = build_plan(load_recipe(path), Registry.load(extra=(NanPlugin(),)))
    nan_at = next(b.term for b in plan.losses if b.label == "nan_at")
    assert nan_at.calls == 1  # the plan rehearsed one training step
    nan_at.calls = 0
    run_dir = tmp_path / "nan"
    with pytest.raises(TrainingStopped) as info:
        train(plan, run_dir, progress=False)
    message = str(info.value)
    assert "at step 13, the loss became nan" in message and "nan_at=nan" in message
    assert f"the last good checkpoint is {run_dir / 'checkpoints' / 'step_0000010'}" in message
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_0000010"]
    assert read_metrics(run_dir / "metrics.jsonl")[-1]["event"] == "non_finite_loss"


def _cli(recipe, *args):
    return [sys.executable, "-m", "compressor", str(recipe), "--quiet", *args]


def test_a_run_killed_with_sigkill_resumes_and_finishes(write_recipe, tmp_path):
    path = write_recipe(
        FAST_RECIPE.replace("steps: 30", "steps: 400").replace("log_every: 5", "log_every: 10"),
        output=False,
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _cli(path, f"output={killed}"), cwd=tmp_path, env=env, stderr=subprocess.PIPE
    )
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if latest.exists() and latest.read_text() >= "step_0000050":
            break
        time.sleep(0.05)
    assert process.poll() is None, (
        f"run ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
    )
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "report.json").exists()
    logged = read_metrics(killed / "metrics.jsonl")
    assert 0 < max(r["step"] for r in logged) < 400

    again = subprocess.run(
        _cli(path, f"output={killed}"), cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert again.returncode == 1 and "--resume" in again.stderr

    resumed = subprocess.run(
        _cli(path, f"output={killed}", "--resume"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads((killed / "report.json").read_text())
    assert report["steps"] == 400 and report["exports"][0]["ok"]

    full = tmp_path / "full"
    subprocess.run(
        _cli(path, f"output={full}"), cwd=tmp_path, env=env, check=True, capture_output=True
    )
    expected, got = (
        _losses(read_metrics(full / "metrics.jsonl")),
        _losses(read_metrics(killed / "metrics.jsonl")),
    )
    assert [s for s, _ in got] == [s for s, _ in expected]
    for (_, a), (_, b) in zip(expected, got, strict=True):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-7)


def test_a_non_finite_loss_before_any_checkpoint_does_not_advise_resume(write_recipe, tmp_path):
    path = write_recipe(
        FAST_RECIPE.replace("losses:\n", "losses:\n  - name: nan_at\n    step: 3\n")
    )
    plan = build_plan(load_recipe(path), Registry.load(extra=(NanPlugin(),)))
    next(b.term for b in plan.losses if b.label == "nan_at").calls = 0
    with pytest.raises(TrainingStopped) as info:
        train(plan, tmp_path / "nan", progress=False)
    message = str(info.value)
    assert (
        "at step 3, the loss became nan" in message and "no checkpoint was written yet" in message
    )
    assert "--resume" not in message and "run again" in message


def test_engine_bench_interleaves_the_hand_loop_step_by_step(capsys):
    """The benchmark's two students see the same batches and maths (weights equal with the
    loop's optimizer kernel), and the loop's steps run inside the engine's run without being
    counted as the engine's."""
    from compressor.bench.engine import bench_engine

    ratio = bench_engine(steps=12, rounds=2, fused=False)
    out = capsys.readouterr().out
    assert "max abs difference 0.00e+00" in out, out
    assert ratio > 0 and "interleaved step by step" in out


def test_backward_seeds_each_term_with_its_weight():
    """The engine's backward gives the weighted sum's gradient; a term that reaches no
    trained parameter adds nothing instead of failing the step."""
    from compressor.step import backward

    w = torch.tensor([1.5, -2.0], requires_grad=True)
    terms = [(w**2).sum(), w.prod(), torch.tensor(3.0)]
    weights = [0.9, 0.1, 5.0]
    expected = torch.autograd.grad(
        sum(t * k for t, k in zip(terms, weights, strict=True)), w, retain_graph=True
    )
    backward(terms, [torch.tensor(k) for k in weights])
    assert torch.equal(w.grad, expected[0])
    with pytest.raises(RuntimeError, match="no loss term depends on a trained parameter"):
        backward([torch.tensor(1.0)], [torch.tensor(1.0)])
