"""Row-wise divergence with its gradient in closed form, shared by the chunked CPU path and
the fused linear path (and mirrored by the Triton kernels).

With q = softmax(s / T), p = softmax(t / T) and g = dL/dq, every divergence here has
dL/d(s/T) = q * (g - <q, g>), which for forward KL and soft CE reduces to q - p.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from compressor.cuda.reference import canonical_kind

RowFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, str, float, float], torch.Tensor
]


def weighted_rows_and_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: torch.Tensor,
    grad_out: torch.Tensor | None,
    kind: str,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """sum(weights * loss per row); the weighted gradient w.r.t. the student logits is
    written into `grad_out` ([c, V], the logits' dtype) so compiled code fuses the store."""
    loss, grad = divergence_rows_and_grad(student_logits, teacher_logits, kind, beta, temperature)
    if grad_out is not None:
        grad_out.copy_(grad * weights[:, None])
    return (loss * weights).sum()


def divergence_rows_and_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    beta: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss per row [c] and its gradient w.r.t. the student logits [c, V], both fp32."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    q = log_q.exp()
    kind = canonical_kind(kind, beta)
    if kind in ("forward_kl", "soft_ce"):
        p = log_p.exp()
        loss = (p * (log_p - log_q)).sum(-1) if kind == "forward_kl" else -(p * log_q).sum(-1)
        return loss, (q - p) / temperature
    if kind == "reverse_kl":
        diff = log_q - log_p
        loss = (q * diff).sum(-1)
        return loss, q * (diff - loss[:, None]) / temperature
    p = log_p.exp()
    if kind == "jsd":
        log_m = torch.log(beta * p + (1.0 - beta) * q)
        loss = beta * (p * (log_p - log_m)).sum(-1) + (1.0 - beta) * (q * (log_q - log_m)).sum(-1)
        g = (1.0 - beta) * (log_q - log_m)
    elif kind == "tv":
        loss = 0.5 * (q - p).abs().sum(-1)
        g = 0.5 * torch.sign(q - p)
    else:
        raise ValueError(f"unknown divergence {kind!r}")
    return loss, q * (g - (q * g).sum(-1, keepdim=True)) / temperature


@functools.cache
def compiled_row_fn() -> RowFn | None:
    """`weighted_rows_and_grad` through torch.compile, or None where compiling fails here
    (no C++ compiler, unsupported platform): callers then use the eager function."""
    try:
        fn = torch.compile(weighted_rows_and_grad, dynamic=True)
        s, t, w = torch.randn(3, 7), torch.randn(3, 7), torch.rand(3)
        got, want = torch.empty(3, 7), torch.empty(3, 7)
        torch.testing.assert_close(
            fn(s, t, w, got, "forward_kl", 0.5, 1.0),
            weighted_rows_and_grad(s, t, w, want, "forward_kl", 0.5, 1.0),
        )
        torch.testing.assert_close(got, want)
        return fn
    except Exception as exc:  # pragma: no cover - depends on the machine
        warnings.warn(
            f"torch.compile is unavailable ({type(exc).__name__}: {exc}); using eager row math",
            stacklevel=2,
        )
        return None


def rows_per_chunk(vocab: int, budget_bytes: int, temporaries: int) -> int:
    """Rows whose `temporaries` fp32 [rows, vocab] arrays fit in `budget_bytes` (at least 1)."""
    return max(1, budget_bytes // (vocab * 4 * temporaries))


def row_weights(
    rows: int, mask: torch.Tensor | None, scale: float, device: torch.device
) -> torch.Tensor:
    """Per-row factor turning row losses into the masked mean (times `scale`): [rows] fp32."""
    if mask is None:
        return torch.full((rows,), scale / max(rows, 1), device=device)
    valid = mask.reshape(-1).to(device=device, dtype=torch.float32)
    return valid * (scale / valid.sum().clamp_min(1.0))
