"""Fused linear distillation: the divergence of two lm_heads' outputs, chunk by chunk over
tokens, without ever holding either model's full [N, V] logits.

Per chunk: student logits = h_s W_s^T + b_s, teacher logits likewise (no grad); the row
math returns the loss and writes d loss / d logits; that gradient goes straight into
d h_s (= g W_s), d W_s (+= g^T h_s) and d b_s (+= sum g). Backward only scales by
grad_output. Under autocast the head matmuls run in the autocast dtype (bf16 on GPUs),
the row math and the weight gradients in fp32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from compressor.cuda.rowwise import RowFn, rows_per_chunk

DEFAULT_MEMORY_BUDGET = 256 * 2**20
TEMPORARIES = 10  # fp32 [rows, V] arrays alive per chunk: both logits, grad, row math


class FusedLinearDivergence(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        student_hidden: torch.Tensor,  # [N, Hs]
        student_weight: torch.Tensor,  # [V, Hs]
        student_bias: torch.Tensor | None,  # [V]
        teacher_hidden: Any,  # [N, Ht], or row-sliceable targets when teacher_weight is None
        teacher_weight: torch.Tensor | None,  # [V, Ht]
        teacher_bias: torch.Tensor | None,
        weights: torch.Tensor,  # [N] fp32: mask * scale / valid rows
        kind: str,
        beta: float,
        temperature: float,
        chunk_rows: int,
        row_fn: RowFn,
    ) -> torch.Tensor:
        need_h, need_w, need_b = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            ctx.needs_input_grad[2],
        )
        grad_h = torch.empty_like(student_hidden) if need_h else None
        # weight gradients accumulate over chunks: fp32 whatever the parameters' dtype
        grad_w = torch.zeros_like(student_weight, dtype=torch.float32) if need_w else None
        grad_b = (
            torch.zeros_like(student_bias, dtype=torch.float32)
            if need_b and student_bias is not None
            else None
        )
        device = student_hidden.device
        # Under autocast the heads run in its dtype (bf16 on GPUs), as unfused linear layers
        # would; autocast is off inside, so every op below sees the dtypes it is given.
        dtype = (
            torch.get_autocast_dtype(device.type)
            if torch.is_autocast_enabled(device.type)
            else student_weight.dtype
        )
        with torch.autocast(device.type, enabled=False):
            w = student_weight.to(dtype)
            b = student_bias.to(dtype) if student_bias is not None else None
            tw = teacher_weight.to(dtype) if teacher_weight is not None else None
            tb = teacher_bias.to(dtype) if teacher_bias is not None else None
            loss = torch.zeros((), dtype=torch.float32, device=device)
            for start in range(0, student_hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                h = student_hidden[rows].to(dtype)
                logits = F.linear(h, w, b)  # [c, V]
                teacher_logits = (  # without a teacher weight: rows of targets the row_fn reads
                    teacher_hidden[rows]
                    if tw is None
                    else F.linear(teacher_hidden[rows].to(dtype), tw, tb)
                )
                grad_logits = torch.empty_like(logits)
                loss += row_fn(
                    logits, teacher_logits, weights[rows], grad_logits, kind, beta, temperature
                )
                del logits, teacher_logits
                if grad_h is not None:
                    grad_h[rows] = grad_logits @ w
                if grad_w is not None:
                    grad_w.addmm_(grad_logits.t().to(grad_w.dtype), h.to(grad_w.dtype))
                if grad_b is not None:
                    grad_b += grad_logits.sum(0, dtype=torch.float32)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (
            student_weight.dtype,
            student_bias.dtype if student_bias is not None else None,
        )
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = None if bool(grad_output == 1.0) else grad_output
        grads = []
        for grad, dtype in ((grad_h, None), (grad_w, ctx.dtypes[0]), (grad_b, ctx.dtypes[1])):
            if grad is not None:
                grad = grad if scale is None else grad * scale.to(grad.dtype)
                grad = grad if dtype is None else grad.to(dtype)
            grads.append(grad)
        return grads[0], grads[1], grads[2], None, None, None, None, None, None, None, None, None


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    weights: torch.Tensor,
    kind: str,
    beta: float,
    temperature: float,
    memory_budget: int,
    row_fn: RowFn,
) -> torch.Tensor:
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    chunk = rows_per_chunk(student_weight.shape[0], memory_budget, TEMPORARIES)
    tw = teacher_weight.detach()
    tb = teacher_bias.detach() if teacher_bias is not None else None
    return FusedLinearDivergence.apply(
        hs,
        student_weight,
        student_bias,
        ht,
        tw,
        tb,
        weights,
        kind,
        beta,
        temperature,
        chunk,
        row_fn,
    )
