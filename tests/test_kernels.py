from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import FAST_RECIPE, TESTS
from kernel_cases import KINDS, check_divergence, check_feature, logits

from compressor.cuda import chunked, kernels, reference
from compressor.cuda.rowwise import divergence_rows_and_grad, weighted_rows_and_grad
from compressor.engine import train
from compressor.plan import build_plan
from compressor.recipe_file import load_recipe
from compressor.registry import Registry

DTYPES = [torch.float32, torch.bfloat16]


def _chunked_eager(s, t, **options):
    # small chunks: 41 rows of 1271 split 6 ways, uneven last chunk
    return chunked.divergence(
        s, t, chunk_bytes=7 * 1271 * 4 * chunked.TEMPORARIES, compiled=False, **options
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_matches_reference(kind, dtype):
    check_divergence(_chunked_eager, kind, dtype)
    check_divergence(_chunked_eager, kind, dtype, masked=True, grad_output=1.0, temperature=1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_with_compiled_row_math_matches_reference(kind):
    check_divergence(
        lambda s, t, **o: kernels.divergence(s, t, impl="chunked", **o),
        kind,
        torch.float32,
        masked=True,
    )


def test_compiled_matches_reference():
    check_divergence(
        lambda s, t, **o: kernels.divergence(s, t, impl="compiled", **o),
        "jsd",
        torch.float32,
        masked=True,
    )


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_endpoints_are_forward_and_reverse_kl(beta):
    s, t = logits(5, 33, torch.float32)
    kl = reference.divergence(s, t, "forward_kl" if beta == 0.0 else "reverse_kl")
    torch.testing.assert_close(reference.divergence(s, t, "jsd", beta=beta), kl)
    check_divergence(_chunked_eager, "jsd", torch.float32, beta=beta)


def test_closed_form_gradients_match_autograd_for_every_kind():
    for kind in KINDS:
        s, t = logits(6, 50, torch.float64)
        s.requires_grad_(True)
        reference.divergence_rows(s, t, kind, 0.3, 1.5).sum().backward()
        _, grad = divergence_rows_and_grad(s.detach(), t, kind, 0.3, 1.5)
        torch.testing.assert_close(grad.double(), s.grad, rtol=1e-5, atol=1e-7, msg=kind)


def test_the_checks_catch_a_perturbed_kernel(monkeypatch):
    def run(s, t, **options):
        return chunked.divergence(s, t, compiled=False, **options)

    def perturbed(s, t, w, grad_out, kind, beta, temperature):
        loss = weighted_rows_and_grad(s, t, w, grad_out, kind, beta, temperature)
        if grad_out is not None:
            grad_out[:, 3] += 1e-3
        return loss

    check_divergence(run, "forward_kl", torch.float32)
    monkeypatch.setattr(chunked, "weighted_rows_and_grad", perturbed)
    with pytest.raises(AssertionError):
        check_divergence(run, "forward_kl", torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_matches_the_unfused_computation(dtype, bias):
    g = torch.Generator().manual_seed(3)
    n, hs, ht, vocab = 37, 24, 40, 1031
    hidden_s = torch.randn(n, hs, generator=g).to(dtype)
    weight_s = (0.3 * torch.randn(vocab, hs, generator=g)).to(dtype)
    bias_s = torch.randn(vocab, generator=g).to(dtype) if bias else None
    hidden_t = torch.randn(n, ht, generator=g).to(dtype)
    weight_t = (0.3 * torch.randn(vocab, ht, generator=g)).to(dtype)
    bias_t = torch.randn(vocab, generator=g).to(dtype) if bias else None
    m = torch.rand(n, generator=g) > 0.2
    results = {}
    for impl in ("reference", "chunked"):
        leaves = [hidden_s.clone().requires_grad_(True), weight_s.clone().requires_grad_(True)]
        if bias_s is not None:
            leaves.append(bias_s.clone().requires_grad_(True))
        loss = kernels.linear_divergence(
            leaves[0], leaves[1], hidden_t, weight_t, leaves[2] if bias else None, bias_t,
            kind="reverse_kl", temperature=1.5, mask=m, impl=impl,
            memory_budget=5 * vocab * 4 * 10,  # 5 rows per chunk: 8 chunks
        )  # fmt: skip
        (loss * 0.8).backward()
        results[impl] = (loss, [leaf.grad for leaf in leaves])
    (want, want_grads), (got, got_grads) = results["reference"], results["chunked"]
    tol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (3e-2, 3e-3)}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol[0], atol=tol[1])
    for a, b in zip(got_grads, want_grads, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=tol[0] * 10, atol=tol[1] * 10)


@pytest.mark.parametrize("kind", ["mse", "cosine", "l1_normalized"])
@pytest.mark.parametrize(("shape", "dim"), [((7, 33), -1), ((3, 5, 4, 4), 1)])
def test_compiled_feature_losses_match_reference(kind, shape, dim):
    check_feature(
        lambda s, t, **o: kernels.feature_loss(s, t, impl="compiled", **o), kind, shape, dim
    )


def test_explicit_choice_that_cannot_run_names_the_implementations(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(
        RuntimeError,
        match="Triton kernels need a CUDA device.*Choose one of: auto, reference, compiled, chunked, triton",
    ):
        kernels.divergence(*logits(2, 5, torch.float32), impl="triton")
    with pytest.raises(RuntimeError, match="unknown implementation 'fast'"):
        kernels.resolve("fast", torch.device("cpu"))
    assert kernels.resolve("auto", torch.device("cpu")) == "chunked"
    # narrow rows run the reference: a kernel costs more than it saves there
    assert kernels.resolve("auto", torch.device("cpu"), 64 * 10) == "reference"
    assert kernels.resolve("auto", torch.device("cpu"), 4096 * 32000) == "chunked"


def test_a_failing_automatic_choice_falls_back_to_the_reference(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(chunked, "divergence", broken)
    monkeypatch.setattr(kernels, "_failed_automatic", set())
    monkeypatch.setattr(kernels, "AUTO_MIN_ELEMENTS", 0)  # tiny logits take the kernel too
    s, t = logits(4, 9, torch.float32)
    with pytest.warns(
        UserWarning, match="automatic implementation 'chunked' failed .*kernel exploded"
    ):
        got = kernels.divergence(s, t, impl="auto")
    torch.testing.assert_close(got, reference.divergence(s, t))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, then quietly uses the reference
        kernels.divergence(s, t, impl="auto")
    with pytest.raises(RuntimeError, match="kernel exploded"):
        kernels.divergence(s, t, impl="chunked")  # an explicit choice is never swapped


def test_triton_kernels_under_the_interpreter():
    """TRITON_INTERPRET must be set before triton is imported: its own process."""
    pytest.importorskip("triton", reason="triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "triton_interpreter_cases.py")],
        env=env, capture_output=True, text=True, cwd=TESTS,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


def test_switching_impl_between_reference_and_auto_trains_the_same_curve(write_recipe, tmp_path):
    path = write_recipe(
        FAST_RECIPE.replace("    temperature: 2.0\n", "    temperature: 2.0\n    divergence: jsd\n")
    )
    curves = {}
    for impl in ("reference", "auto"):
        recipe = load_recipe(path, [f"losses.0.impl={impl}", f"losses.2.impl={impl}"])
        result = train(build_plan(recipe, Registry.load()), tmp_path / impl, progress=False)
        curves[impl] = [(r["step"], r["loss"]) for r in result.history if "loss" in r]
    assert [s for s, _ in curves["auto"]] == [s for s, _ in curves["reference"]]
    for (_, a), (_, b) in zip(curves["reference"], curves["auto"], strict=True):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6)
