"""Triton kernels against the reference; run by test_kernels.py with TRITON_INTERPRET=1.

Interpreter shapes stay small: it runs each program in Python."""

from __future__ import annotations

import os

import pytest
import torch
from kernel_cases import KINDS, check_divergence, check_feature

from compressor.cuda import kernels

assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_kernels.py"


def _triton(s, t, **options):
    return kernels.divergence(s, t, impl="triton", **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_divergence(kind, dtype):
    check_divergence(_triton, kind, dtype, rows=9, vocab=1271)
    check_divergence(
        _triton, kind, dtype, rows=7, vocab=5000, masked=True, temperature=1.0, grad_output=1.0
    )


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_endpoints(beta):
    check_divergence(_triton, "jsd", torch.float32, rows=5, vocab=300, beta=beta)


def test_perturbed_kernel_is_caught(monkeypatch):
    from compressor.cuda import triton_kernels

    monkeypatch.setitem(triton_kernels.KINDS, "forward_kl", triton_kernels.KINDS["soft_ce"])
    with pytest.raises(AssertionError):
        check_divergence(_triton, "forward_kl", torch.float32, rows=3, vocab=100)


def test_fused_linear():
    g = torch.Generator().manual_seed(0)
    hs, ws, ht, wt = (
        torch.randn(6, 8, generator=g),
        torch.randn(301, 8, generator=g),
        torch.randn(6, 12, generator=g),
        torch.randn(301, 12, generator=g),
    )
    grads = {}
    for impl in ("reference", "triton"):
        h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        loss = kernels.linear_divergence(
            h, w, ht, wt, kind="jsd", temperature=2.0, impl=impl, memory_budget=2 * 301 * 40
        )
        loss.backward()
        grads[impl] = (loss.detach(), h.grad, w.grad)
    for got, want in zip(grads["triton"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["mse", "cosine", "l1_normalized"])
@pytest.mark.parametrize(("shape", "dim"), [((7, 33), -1), ((3, 5, 4, 4), 1)])
def test_feature_losses(kind, shape, dim):
    check_feature(
        lambda s, t, **o: kernels.feature_loss(s, t, impl="triton", **o), kind, shape, dim
    )
    check_feature(
        lambda s, t, **o: kernels.feature_loss(s, t, impl="triton", **o),
        kind,
        shape,
        dim,
        dtype=torch.bfloat16,
    )
