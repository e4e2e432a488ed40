"""Cases shared by the kernel tests: inputs, the reference, and per-dtype tolerances."""

from __future__ import annotations

import torch

from compressor.cuda import reference

KINDS = list(reference.DIVERGENCES)
# (loss rtol, loss atol, grad rtol, grad atol) per input dtype
TOLERANCES = {torch.float32: (1e-5, 1e-6, 1e-4, 1e-7), torch.bfloat16: (1e-4, 1e-5, 2e-2, 1e-5)}


def logits(
    rows: int, vocab: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(rows, vocab, generator=generator)).to(dtype)
    t = (3 * torch.randn(rows, vocab, generator=generator)).to(dtype)
    return s, t


def mask(rows: int, seed: int = 1) -> torch.Tensor:
    m = torch.rand(rows, generator=torch.Generator().manual_seed(seed)) > 0.3
    m[0] = True
    return m


def check_divergence(
    run,
    kind: str,
    dtype: torch.dtype,
    rows: int = 41,
    vocab: int = 1271,
    masked: bool = False,
    grad_output: float = 1.7,
    temperature: float = 2.0,
    beta: float = 0.3,
) -> None:
    """`run(s, t, **options)` must match the reference in loss and gradient."""
    s, t = logits(rows, vocab, dtype)
    m = mask(rows) if masked else None
    options = dict(kind=kind, beta=beta, temperature=temperature, mask=m)
    s_ref = s.clone().requires_grad_(True)
    want = reference.divergence(s_ref, t, **options)
    (want * grad_output).backward()
    s_got = s.clone().requires_grad_(True)
    got = run(s_got, t, **options)
    (got * grad_output).backward()
    loss_rtol, loss_atol, grad_rtol, grad_atol = TOLERANCES[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=loss_rtol, atol=loss_atol)
    assert s_got.grad is not None and s_got.grad.dtype == dtype
    torch.testing.assert_close(
        s_got.grad.float(), s_ref.grad.float(), rtol=grad_rtol, atol=grad_atol
    )
    if masked:
        assert bool((s_got.grad[~m] == 0).all())


def check_feature(
    run,
    kind: str,
    shape: tuple[int, ...],
    dim: int,
    dtype: torch.dtype = torch.float32,
    grad_output: float = 0.6,
) -> None:
    generator = torch.Generator().manual_seed(2)
    s = torch.randn(*shape, generator=generator).to(dtype)
    t = torch.randn(*shape, generator=generator).to(dtype)
    s_ref = s.clone().requires_grad_(True)
    want = reference.feature_loss(s_ref, t, kind, dim)
    (want * grad_output).backward()
    s_got = s.clone().requires_grad_(True)
    got = run(s_got, t, kind=kind, dim=dim)
    (got * grad_output).backward()
    loss_rtol, loss_atol, grad_rtol, grad_atol = TOLERANCES[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=loss_rtol, atol=loss_atol)
    torch.testing.assert_close(
        s_got.grad.float(), s_ref.grad.float(), rtol=grad_rtol, atol=max(grad_atol, 1e-6)
    )
