"""Divergences over row chunks with the gradient computed in the forward.

Only the [N, V] gradient (in the input dtype) and one chunk of fp32 temporaries are ever
alive, instead of the several [N, V] tensors autograd would save. Chunks are sized in bytes.
"""

from __future__ import annotations

from typing import Any

import torch

from compressor.cuda.rowwise import (
    RowFn,
    compiled_row_fn,
    row_weights,
    rows_per_chunk,
    weighted_rows_and_grad,
)

DEFAULT_CHUNK_BYTES = 64 * 2**20
# fp32 [rows, V] temporaries the row math keeps alive at once (upper bound, eager)
TEMPORARIES = 8


class ChunkedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        student_logits: torch.Tensor,  # [N, V]
        teacher_logits: torch.Tensor,  # [N, V]
        weights: torch.Tensor,  # [N] fp32: mask * scale / valid rows
        kind: str,
        beta: float,
        temperature: float,
        chunk_rows: int,
        row_fn: RowFn,
    ) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(student_logits) if want_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        for start in range(0, student_logits.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            grad_rows = grad[rows] if grad is not None else None
            loss += row_fn(
                student_logits[rows],
                teacher_logits[rows],
                weights[rows],
                grad_rows,
                kind,
                beta,
                temperature,
            )
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        if grad is not None and not bool(grad_output == 1.0):
            grad = grad * grad_output.to(grad.dtype)
        return grad, None, None, None, None, None, None, None


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    t2_scale: bool = True,
    mask: torch.Tensor | None = None,
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
    compiled: bool = True,
    row_fn: RowFn | None = None,
) -> torch.Tensor:
    """`row_fn` computes the rows (default: the compiled or eager PyTorch row math; the Triton
    path passes its kernel); `chunk_bytes=None` takes all rows in one chunk."""
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.reshape(-1, vocab).detach()
    weights = row_weights(s.shape[0], mask, temperature**2 if t2_scale else 1.0, s.device)
    row_fn = row_fn or (compiled_row_fn() if compiled else None) or weighted_rows_and_grad
    rows = s.shape[0] if chunk_bytes is None else rows_per_chunk(vocab, chunk_bytes, TEMPORARIES)
    return ChunkedDivergence.apply(s, t, weights, kind, beta, temperature, rows, row_fn)
