"""Plain fp32 PyTorch references: the oracle every faster implementation is tested against,
and the fallback when none can run.

Divergences compare the student distribution q = softmax(s / T) with the teacher
distribution p = softmax(t / T), row by row over the last dimension:

- forward_kl  KL(p || q)                      (Hinton KD)
- reverse_kl  KL(q || p)
- jsd         beta * KL(p || m) + (1 - beta) * KL(q || m),  m = beta * p + (1 - beta) * q;
              beta = 0 is exactly forward_kl and beta = 1 exactly reverse_kl
- tv          0.5 * sum |q - p|
- soft_ce     -sum p * log q

The loss is the mean over valid rows (rows not masked out), times T^2 when `t2_scale`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tv", "soft_ce")
FEATURE_LOSSES = ("mse", "cosine", "l1_normalized")


def canonical_kind(kind: str, beta: float) -> str:
    """JSD at beta 0 and 1 is exactly forward and reverse KL; kernels compute those directly."""
    if kind == "jsd" and beta in (0.0, 1.0):
        return "forward_kl" if beta == 0.0 else "reverse_kl"
    return kind


def divergence_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """Per-row divergence [N] of [N, V] logits, in fp32."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kind = canonical_kind(kind, beta)
    if kind == "forward_kl":  # p * (log p - log q), as one fused op
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    if kind == "soft_ce":
        return -(log_p.exp() * log_q).sum(-1)
    if kind == "reverse_kl":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    if kind == "jsd":
        p, q = log_p.exp(), log_q.exp()
        log_m = torch.log(beta * p + (1.0 - beta) * q)
        return beta * (p * (log_p - log_m)).sum(-1) + (1.0 - beta) * (q * (log_q - log_m)).sum(-1)
    if kind == "tv":
        return 0.5 * (log_q.exp() - log_p.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; known: {', '.join(DIVERGENCES)}")


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    t2_scale: bool = True,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean divergence over valid rows; logits [..., V], mask [...] (True = counts)."""
    vocab = student_logits.shape[-1]
    scale = temperature**2 if t2_scale else 1.0
    if mask is None and canonical_kind(kind, beta) == "forward_kl":
        # the common case in as few op calls as possible: small classifiers spend their step
        # in them (batchmean over [N, V] rows is the mean over rows)
        if student_logits.dim() != 2:
            student_logits = student_logits.reshape(-1, vocab)
            teacher_logits = teacher_logits.reshape(-1, vocab)
        log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
        log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
        return kl * scale if scale != 1.0 else kl
    rows = divergence_rows(
        student_logits.reshape(-1, vocab),
        teacher_logits.reshape(-1, vocab),
        kind,
        beta,
        temperature,
    )
    if mask is None:
        return rows.mean() * scale
    valid = mask.reshape(-1).to(rows.dtype)
    return (rows * valid).sum() / valid.sum().clamp_min(1.0) * scale


def linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    **options: object,
) -> torch.Tensor:
    """The unfused computation: both models' full [N, V] logits, then `divergence`."""
    student_logits = F.linear(student_hidden, student_weight, student_bias)
    with torch.no_grad():
        teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias)
    return divergence(student_logits, teacher_logits, **options)  # type: ignore[arg-type]


def feature_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse", dim: int = -1
) -> torch.Tensor:
    """mse: mean squared error over all elements; cosine: mean of 1 - cos along `dim`;
    l1_normalized: mean over positions of the L1 distance of L2-normalised vectors along `dim`."""
    s, t = student.float(), teacher.float()
    if kind == "mse":
        return F.mse_loss(s, t)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=dim, eps=1e-8)).mean()
    if kind == "l1_normalized":
        return (
            (F.normalize(s, dim=dim, eps=1e-8) - F.normalize(t, dim=dim, eps=1e-8))
            .abs()
            .sum(dim)
            .mean()
        )
    raise ValueError(f"unknown feature loss {kind!r}; known: {', '.join(FEATURE_LOSSES)}")
