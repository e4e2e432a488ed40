"""Sparse teacher targets: the teacher's top-k log-probabilities plus the mass of the rest.

A cached teacher keeps, per token, the k most likely classes at the loss's temperature T and
the log of the probability left for all others (the tail). The student is compared on the
same k + 1 buckets: its log-probabilities of the k classes and of its own tail. Every
divergence of `reference` applies to these bucket distributions; with k equal to the
vocabulary it is the dense divergence exactly, and it never exceeds it (merging classes
cannot increase a divergence).

Both functions work chunk by chunk over rows within a byte budget. The divergence runs
through the same autograd Functions as the dense kernels (`ChunkedDivergence` on logits,
`FusedLinearDivergence` from hidden states and a head), with the gradient of each chunk in
closed form, so no [N, V] array is held beyond a chunk (and, unfused, the logits' gradient).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from compressor.cuda.chunked import ChunkedDivergence
from compressor.cuda.fused_linear import FusedLinearDivergence
from compressor.cuda.reference import divergence_rows
from compressor.cuda.rowwise import row_weights, rows_per_chunk

DEFAULT_MEMORY_BUDGET = 256 * 2**20
TEMPORARIES = 6  # fp32 [rows, V] arrays alive per chunk: logits, z, log q, q, gradient
LOG_FLOOR = -1e4  # log of a probability that is 0: finite, so 0 * log stays 0


class SparseTargets(NamedTuple):
    classes: torch.Tensor  # [..., k] int32 (4 bytes each): the teacher's k most likely classes
    log_prob: torch.Tensor  # [..., k] fp32: their log-probabilities at temperature T
    tail: torch.Tensor  # [...] fp32: log of the probability of every other class


def _logits(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    return (x if weight is None else F.linear(x, weight, bias)).float()


def _tail(log_probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log sum_{j not in index} p_j, from the other classes themselves (exact, stable)."""
    rest = log_probs.scatter(-1, index, float("-inf"))
    return torch.logsumexp(rest, dim=-1).clamp_min(LOG_FLOOR)


@torch.no_grad()
def top_k_targets(
    x: torch.Tensor,
    k: int,
    temperature: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> SparseTargets:
    """The teacher's sparse targets from logits [..., V], or from hidden states [..., H] and
    its head (`weight` [V, H], `bias`)."""
    vocab = x.shape[-1] if weight is None else weight.shape[0]
    rows = x.reshape(-1, x.shape[-1])
    k = min(k, vocab)
    chunk = rows_per_chunk(vocab, memory_budget, TEMPORARIES)
    parts = []
    for start in range(0, rows.shape[0], chunk):
        log_probs = F.log_softmax(
            _logits(rows[start : start + chunk], weight, bias) / temperature, -1
        )
        log_prob, index = log_probs.topk(k, dim=-1)
        parts.append((index.int(), log_prob, _tail(log_probs, index)))
    lead = x.shape[:-1]
    index, log_prob, tail = (torch.cat(p) for p in zip(*parts, strict=True))
    return SparseTargets(index.reshape(*lead, k), log_prob.reshape(*lead, k), tail.reshape(lead))


class SparseRows:
    """Flattened sparse targets that chunked kernels slice by rows, as they slice logits:
    `classes` [N, k] and the buckets' log-probabilities `target` [N, k (+ 1 with a tail)]."""

    def __init__(self, classes: torch.Tensor, target: torch.Tensor):
        self.classes, self.target = classes, target

    def __getitem__(self, rows: slice) -> SparseRows:
        return SparseRows(self.classes[rows], self.target[rows])


def sparse_rows_and_grad(
    student_logits: torch.Tensor,
    teacher: SparseRows,  # a RowFn's teacher rows
    weights: torch.Tensor,
    grad_out: torch.Tensor | None,
    kind: str,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """sum(weights * divergence on the buckets) for a chunk of rows, its gradient w.r.t. the
    student logits written into `grad_out`.

    With z = s / T, q = softmax(z), Q the student's tail mass and g = dL/d(log q_b) per bucket
    (from autograd on the small [c, k + 1] bucket tensor), G = sum_b g_b:
    dL/dz_j = g_j - q_j G for a kept class j, and q_j (g_tail / Q - G) for any other."""
    z = student_logits.float() / temperature
    log_q = z - torch.logsumexp(z, dim=-1, keepdim=True)
    del z
    classes = teacher.classes
    buckets = log_q.gather(-1, classes)
    q = log_q.exp()
    with_tail = teacher.target.shape[-1] > classes.shape[-1]
    if with_tail:  # log of the student's mass on the other classes, from those classes
        log_q.scatter_(-1, classes, float("-inf"))
        log_tail = torch.logsumexp(log_q, dim=-1, keepdim=True)
        buckets = torch.cat([buckets, log_tail.clamp_min(LOG_FLOOR)], -1)
    with torch.enable_grad():
        leaf = buckets.detach().requires_grad_(True)
        # the buckets are normalised already: temperature 1 leaves them as they are
        rows = divergence_rows(leaf, teacher.target, kind, beta, 1.0)
        total = (rows * weights).sum()
        (g,) = torch.autograd.grad(total, leaf)
    if grad_out is not None:
        g_total = g.sum(-1, keepdim=True)
        grad = q.mul_(-g_total)  # -q_j G for every class
        if with_tail:  # + g_tail q_j / Q for the other classes (0 where kept: log_q is -inf)
            grad += log_q.sub_(log_tail).exp_() * g[:, -1:]
        grad.scatter_add_(-1, classes, g[:, : classes.shape[-1]])  # + g_j for kept classes
        grad_out.copy_(grad / temperature)
    return total.detach()


def sparse_divergence(
    student: torch.Tensor,
    targets: SparseTargets,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    t2_scale: bool = True,
    mask: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> torch.Tensor:
    """Mean divergence over valid rows between the teacher's sparse targets and the student's
    logits [..., V], or its hidden states [..., H] with head `weight` [V, H] and `bias`."""
    vocab = student.shape[-1] if weight is None else weight.shape[0]
    x = student.reshape(-1, student.shape[-1])
    n, k = x.shape[0], targets.classes.shape[-1]
    parts = [targets.log_prob.reshape(n, k).float()]
    if k < vocab:
        parts.append(targets.tail.reshape(n, 1).float())
    classes = targets.classes.reshape(n, k).to(x.device, torch.int64)  # what gather takes
    teacher = SparseRows(classes, torch.cat(parts, -1))
    weights = row_weights(n, mask, temperature**2 if t2_scale else 1.0, x.device)
    chunk = rows_per_chunk(vocab, memory_budget, TEMPORARIES)
    if weight is None:
        return ChunkedDivergence.apply(
            x, teacher, weights, kind, beta, temperature, chunk, sparse_rows_and_grad
        )
    return FusedLinearDivergence.apply(
        x,
        weight,
        bias,
        teacher,
        None,
        None,
        weights,
        kind,
        beta,
        temperature,
        chunk,
        sparse_rows_and_grad,
    )
