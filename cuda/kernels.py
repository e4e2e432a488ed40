"""Distillation-loss kernels behind one API, selected by implementation name.

- `reference`: plain fp32 PyTorch with autograd: the oracle, and the fallback.
- `compiled`:  torch.compile of the reference formula.
- `chunked`:   an autograd Function computing the gradient in the forward over row chunks
               sized in bytes; the per-chunk math is compiled where torch.compile works.
- `triton`:    Triton kernels (NVIDIA GPUs; CPU tensors under TRITON_INTERPRET=1).
- `auto`:      by size and device: the reference for tensors under AUTO_MIN_ELEMENTS
               elements (narrow rows, where a kernel's per-call and compile cost outweigh
               what it saves), else triton on CUDA when it imports, else chunked. If the
               automatic choice fails at run time, the call falls back to the reference with
               a warning.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from compressor.cuda import chunked, reference
from compressor.cuda.fused_linear import DEFAULT_MEMORY_BUDGET, fused_linear_divergence
from compressor.cuda.rowwise import compiled_row_fn, row_weights, weighted_rows_and_grad

IMPLEMENTATIONS = ("reference", "compiled", "chunked", "triton")
CHOICES = ("auto", *IMPLEMENTATIONS)
_failed_automatic: set[tuple[str, str]] = set()
# Below this many elements ([N, V] logits, [N, D] features) `auto` runs the reference: on 2 CPU
# cores the chunked kernel is 1.4x slower than it at 64 x 10 and breaks even near 2^18, and it
# costs seconds of compilation on first use; from 4M elements on it is 2.5-5x faster.
AUTO_MIN_ELEMENTS = 2**22


def unavailable_reason(impl: str, device: torch.device) -> str | None:
    """Why `impl` cannot run on `device` here, or None when it can."""
    if impl not in IMPLEMENTATIONS:
        return f"unknown implementation {impl!r}; registered: {', '.join(IMPLEMENTATIONS)}"
    if impl == "compiled" and compiled_row_fn() is None:
        return "torch.compile does not work on this machine"
    if impl == "triton":
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed"
        if device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
            return f"Triton kernels need a CUDA device (got {device.type}; TRITON_INTERPRET=1 runs them on CPU for tests)"
    return None


def resolve(impl: str, device: torch.device, elements: int | None = None) -> str:
    """The implementation that will run on tensors of `elements` elements (None: large);
    an explicit choice that cannot run is an error."""
    if impl == "auto":
        if elements is not None and elements < AUTO_MIN_ELEMENTS:
            return "reference"
        return (
            "triton"
            if unavailable_reason("triton", device) is None and device.type == "cuda"
            else "chunked"
        )
    reason = unavailable_reason(impl, device)
    if reason is not None:
        raise RuntimeError(
            f"loss implementation {impl!r} cannot run: {reason}. Choose one of: {', '.join(CHOICES)}"
        )
    return impl


def _dispatch(
    op: str,
    impl: str,
    like: torch.Tensor,
    run: Callable[[str], torch.Tensor],
    fallback: Callable[[], torch.Tensor],
    elements: int | None = None,
) -> torch.Tensor:
    """Run the chosen implementation for tensors like `like` (`elements` of them, default
    `like.numel()`), falling back to the reference if an automatic choice fails."""
    chosen = resolve(impl, like.device, like.numel() if elements is None else elements)
    if impl != "auto" or chosen == "reference":
        return run(chosen)
    if (op, chosen) in _failed_automatic:
        return fallback()
    try:
        return run(chosen)
    except Exception as exc:
        _failed_automatic.add((op, chosen))
        warnings.warn(
            f"{op}: automatic implementation {chosen!r} failed ({type(exc).__name__}: {exc}); using the reference from now on",
            stacklevel=3,
        )
        return fallback()


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    t2_scale: bool = True,
    mask: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Mean divergence over valid rows of [..., V] logits (see `reference` for the kinds)."""
    if kind not in reference.DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; known: {', '.join(reference.DIVERGENCES)}")
    options: dict[str, Any] = dict(
        kind=kind, beta=beta, temperature=temperature, t2_scale=t2_scale, mask=mask
    )

    def run(name: str) -> torch.Tensor:
        if name == "reference":
            return reference.divergence(student_logits, teacher_logits, **options)
        if name == "compiled":
            return _compiled_divergence()(student_logits, teacher_logits, **options)
        if name == "chunked":
            return chunked.divergence(student_logits, teacher_logits, **options)
        # triton: one program per row over all rows at once, through the same Function
        return chunked.divergence(
            student_logits,
            teacher_logits,
            **options,
            chunk_bytes=None,
            row_fn=_triton().divergence_rows,
        )

    return _dispatch("divergence", impl, student_logits, run, lambda: run("reference"))


def linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    t2_scale: bool = True,
    mask: torch.Tensor | None = None,
    impl: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> torch.Tensor:
    """Divergence of lm_head outputs from hidden states [..., H] and weights [V, H]; every
    implementation but `reference`/`compiled` works chunk by chunk within `memory_budget`."""
    options: dict[str, Any] = dict(
        kind=kind, beta=beta, temperature=temperature, t2_scale=t2_scale, mask=mask
    )
    args = (student_hidden, student_weight, teacher_hidden, teacher_weight)

    def run(name: str) -> torch.Tensor:
        if name in ("reference", "compiled"):
            fn = reference.linear_divergence if name == "reference" else _compiled_linear()
            return fn(*args, student_bias=student_bias, teacher_bias=teacher_bias, **options)
        row_fn = (
            _triton().divergence_rows
            if name == "triton"
            else (compiled_row_fn() or weighted_rows_and_grad)
        )
        rows = student_hidden.reshape(-1, student_hidden.shape[-1]).shape[0]
        weights = row_weights(
            rows, mask, temperature**2 if t2_scale else 1.0, student_hidden.device
        )
        return fused_linear_divergence(
            *args,
            student_bias,
            teacher_bias,
            weights,
            kind,
            beta,
            temperature,
            memory_budget,
            row_fn,
        )

    return _dispatch(
        "linear_divergence",
        impl,
        student_hidden,
        run,
        lambda: run("reference"),
        elements=student_hidden.numel() // student_hidden.shape[-1] * student_weight.shape[0],
    )


def feature_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str = "mse",
    dim: int = -1,
    impl: str = "auto",
) -> torch.Tensor:
    """mse / cosine / l1_normalized between features (see `reference.feature_loss`)."""
    if kind not in reference.FEATURE_LOSSES:
        raise ValueError(
            f"unknown feature loss {kind!r}; known: {', '.join(reference.FEATURE_LOSSES)}"
        )

    def run(name: str) -> torch.Tensor:
        if name == "reference":
            return reference.feature_loss(student, teacher, kind, dim)
        if name in ("compiled", "chunked"):  # a single fused pass is what compiling gives here
            return _compiled_feature()(student, teacher, kind, dim)
        return _TritonFeature.apply(student, teacher.detach(), kind, dim)

    return _dispatch("feature_loss", impl, student, run, lambda: run("reference"))


@functools.cache
def _compiled_divergence() -> Callable[..., torch.Tensor]:
    return torch.compile(reference.divergence, dynamic=True)


@functools.cache
def _compiled_linear() -> Callable[..., torch.Tensor]:
    return torch.compile(reference.linear_divergence, dynamic=True)


@functools.cache
def _compiled_feature() -> Callable[..., torch.Tensor]:
    return torch.compile(reference.feature_loss, dynamic=True)


def _triton() -> Any:
    from compressor.cuda import triton_kernels

    return triton_kernels


class _TritonFeature(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, student: torch.Tensor, teacher: torch.Tensor, kind: str, dim: int
    ) -> torch.Tensor:
        # rows along `dim`: move it last, keep a contiguous [R, D] view
        s = student.movedim(dim, -1).contiguous()
        t = teacher.movedim(dim, -1).contiguous()
        shape = s.shape
        grad = torch.empty_like(s) if ctx.needs_input_grad[0] else None
        loss = _triton().feature_rows(
            s.reshape(-1, shape[-1]),
            t.reshape(-1, shape[-1]),
            kind,
            grad.view(-1, shape[-1]) if grad is not None else None,
        )
        ctx.save_for_backward(grad)
        ctx.dim = dim
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None
        grad = grad.movedim(-1, ctx.dim)
        if not bool(grad_output == 1.0):
            grad = grad * grad_output.to(grad.dtype)
        return grad, None, None, None
