"""Triton kernels for NVIDIA GPUs (and for CPU tests under TRITON_INTERPRET=1).

Divergences: one program per row, online softmax in fp32 over blocks of the vocabulary.
Pass 1 finds max and sum-exp of both rows; pass 2 accumulates the row loss (and <q, g>);
forward KL and soft CE write the gradient in pass 2, reverse KL, JSD and TV in a pass 3.
Only a per-row loss is written besides the gradient: never an [N, V] loss buffer.

Feature losses: one program per row (cosine, normalised L1) or per block (MSE), loss and
gradient in the same launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compressor.cuda.reference import canonical_kind

KINDS = {"forward_kl": 0, "soft_ce": 1, "reverse_kl": 2, "jsd": 3, "tv": 4}


@triton.jit
def _divergence_kernel(
    s_ptr, t_ptr, w_ptr, loss_ptr, grad_ptr,
    s_stride, t_stride, g_stride, V, inv_t, beta,
    KIND: tl.constexpr, WANT_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = grad_ptr + row * g_stride
    w = tl.load(w_ptr + row).to(tl.float32)

    # pass 1: online max and sum of exp for student and teacher
    m_s = -float("inf")
    d_s = 0.0
    m_t = -float("inf")
    d_t = 0.0
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < V
        zs = tl.load(s_row + offs, mask=valid, other=-float("inf")).to(tl.float32) * inv_t
        zt = tl.load(t_row + offs, mask=valid, other=-float("inf")).to(tl.float32) * inv_t
        new_m_s = tl.maximum(m_s, tl.max(zs, 0))
        d_s = d_s * tl.exp(m_s - new_m_s) + tl.sum(tl.exp(zs - new_m_s), 0)
        m_s = new_m_s
        new_m_t = tl.maximum(m_t, tl.max(zt, 0))
        d_t = d_t * tl.exp(m_t - new_m_t) + tl.sum(tl.exp(zt - new_m_t), 0)
        m_t = new_m_t
    lse_s = m_s + tl.log(d_s)
    lse_t = m_t + tl.log(d_t)

    # pass 2: row loss, and <q, g> where the gradient needs it
    loss = 0.0
    qg = 0.0
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < V
        log_q = tl.load(s_row + offs, mask=valid, other=0.0).to(tl.float32) * inv_t - lse_s
        log_p = tl.load(t_row + offs, mask=valid, other=0.0).to(tl.float32) * inv_t - lse_t
        q = tl.exp(log_q)
        p = tl.exp(log_p)
        if KIND == 0:
            loss += tl.sum(tl.where(valid, p * (log_p - log_q), 0.0), 0)
        elif KIND == 1:
            loss += tl.sum(tl.where(valid, -p * log_q, 0.0), 0)
        elif KIND == 2:
            loss += tl.sum(tl.where(valid, q * (log_q - log_p), 0.0), 0)
        elif KIND == 3:
            log_m = tl.log(beta * p + (1.0 - beta) * q)
            term = beta * p * (log_p - log_m) + (1.0 - beta) * q * (log_q - log_m)
            loss += tl.sum(tl.where(valid, term, 0.0), 0)
            qg += tl.sum(tl.where(valid, q * (1.0 - beta) * (log_q - log_m), 0.0), 0)
        else:
            diff = q - p
            loss += tl.sum(tl.where(valid, 0.5 * tl.abs(diff), 0.0), 0)
            sign = tl.where(diff > 0, 0.5, tl.where(diff < 0, -0.5, 0.0))
            qg += tl.sum(tl.where(valid, q * sign, 0.0), 0)
        if WANT_GRAD and KIND <= 1:
            grad = (q - p) * (inv_t * w)
            tl.store(g_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=valid)
    tl.store(loss_ptr + row, loss * w)

    # pass 3: gradients that need the whole row's loss or <q, g>
    if WANT_GRAD and KIND >= 2:
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < V
            log_q = tl.load(s_row + offs, mask=valid, other=0.0).to(tl.float32) * inv_t - lse_s
            log_p = tl.load(t_row + offs, mask=valid, other=0.0).to(tl.float32) * inv_t - lse_t
            q = tl.exp(log_q)
            if KIND == 2:
                grad = q * (log_q - log_p - loss)
            elif KIND == 3:
                log_m = tl.log(beta * tl.exp(log_p) + (1.0 - beta) * q)
                grad = q * ((1.0 - beta) * (log_q - log_m) - qg)
            else:
                diff = q - tl.exp(log_p)
                sign = tl.where(diff > 0, 0.5, tl.where(diff < 0, -0.5, 0.0))
                grad = q * (sign - qg)
            grad = grad * (inv_t * w)
            tl.store(g_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=valid)


def _block(n: int) -> int:
    return min(triton.next_power_of_2(n), 4096)


def divergence_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: torch.Tensor,
    grad_out: torch.Tensor | None,
    kind: str,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """Same contract as `rowwise.weighted_rows_and_grad`: returns sum(weights * row loss) and
    writes the weighted gradient into `grad_out`."""
    kind = canonical_kind(kind, beta)
    s = student_logits.contiguous()
    t = teacher_logits.contiguous()
    rows, vocab = s.shape
    loss = torch.empty(rows, dtype=torch.float32, device=s.device)
    grad = grad_out if grad_out is not None else loss  # any pointer; unused without WANT_GRAD
    _divergence_kernel[(rows,)](
        s, t, weights.contiguous(), loss, grad,
        s.stride(0), t.stride(0), grad.stride(0), vocab, 1.0 / temperature, float(beta),
        KIND=KINDS[kind], WANT_GRAD=grad_out is not None, BLOCK=_block(vocab),
        num_warps=8 if vocab >= 8192 else 4,
    )  # fmt: skip
    return loss.sum()


@triton.jit
def _feature_row_kernel(
    s_ptr, t_ptr, loss_ptr, grad_ptr, D, scale, eps,
    KIND: tl.constexpr, WANT_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # KIND 0: 1 - cosine; KIND 1: L1 distance of L2-normalised rows. Rows are contiguous.
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * D
    t_row = t_ptr + row * D
    g_row = grad_ptr + row * D
    dot = 0.0
    ss = 0.0
    tt = 0.0
    for start in range(0, D, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < D
        s = tl.load(s_row + offs, mask=valid, other=0.0).to(tl.float32)
        t = tl.load(t_row + offs, mask=valid, other=0.0).to(tl.float32)
        dot += tl.sum(s * t, 0)
        ss += tl.sum(s * s, 0)
        tt += tl.sum(t * t, 0)
    ns = tl.maximum(tl.sqrt(ss), eps)
    nt = tl.maximum(tl.sqrt(tt), eps)
    if KIND == 0:
        cos = dot / (ns * nt)
        tl.store(loss_ptr + row, (1.0 - cos) * scale)
        if WANT_GRAD:
            for start in range(0, D, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                valid = offs < D
                s = tl.load(s_row + offs, mask=valid, other=0.0).to(tl.float32)
                t = tl.load(t_row + offs, mask=valid, other=0.0).to(tl.float32)
                grad = -(t / (ns * nt) - cos * s / (ns * ns)) * scale
                tl.store(g_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=valid)
    else:
        loss = 0.0
        sg = 0.0
        for start in range(0, D, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < D
            s = tl.load(s_row + offs, mask=valid, other=0.0).to(tl.float32) / ns
            t = tl.load(t_row + offs, mask=valid, other=0.0).to(tl.float32) / nt
            diff = s - t
            loss += tl.sum(tl.abs(diff), 0)
            sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
            sg += tl.sum(s * sign, 0)
        tl.store(loss_ptr + row, loss * scale)
        if WANT_GRAD:
            for start in range(0, D, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                valid = offs < D
                s = tl.load(s_row + offs, mask=valid, other=0.0).to(tl.float32) / ns
                t = tl.load(t_row + offs, mask=valid, other=0.0).to(tl.float32) / nt
                diff = s - t
                sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
                grad = (sign - s * sg) / ns * scale
                tl.store(g_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _mse_kernel(
    s_ptr, t_ptr, loss_ptr, grad_ptr, n, scale, WANT_GRAD: tl.constexpr, BLOCK: tl.constexpr
):
    block = tl.program_id(0).to(tl.int64)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    s = tl.load(s_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    diff = s - t
    tl.store(loss_ptr + block, tl.sum(diff * diff, 0) * scale)
    if WANT_GRAD:
        tl.store(grad_ptr + offs, (2.0 * diff * scale).to(grad_ptr.dtype.element_ty), mask=valid)


def feature_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str,
    grad_out: torch.Tensor | None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Mean feature loss of [R, D] rows (`mse`: over all elements); the gradient of that mean
    is written into `grad_out` ([R, D], contiguous) when given."""
    s, t = student.contiguous(), teacher.contiguous()
    rows, dim = s.shape
    want = grad_out is not None
    if kind == "mse":
        n = s.numel()
        block = 1024
        partial = torch.empty(triton.cdiv(n, block), dtype=torch.float32, device=s.device)
        _mse_kernel[(partial.numel(),)](
            s, t, partial, grad_out if want else partial, n, 1.0 / n, WANT_GRAD=want, BLOCK=block
        )
        return partial.sum()
    loss = torch.empty(rows, dtype=torch.float32, device=s.device)
    _feature_row_kernel[(rows,)](
        s, t, loss, grad_out if want else loss, dim, 1.0 / rows, eps,
        KIND=0 if kind == "cosine" else 1, WANT_GRAD=want, BLOCK=_block(dim),
    )  # fmt: skip
    return loss.sum()
