"""Built-in loss terms: logit distillation (Hinton KD and the divergence family), ground-truth
cross entropy, and feature losses (MSE, cosine, normalised L1) with learned projections."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from compressor.api import IGNORE, LossInputs, LossTerm, Shapes, format_shape, hookimpl, token_grid
from compressor.cuda import kernels, sparse
from compressor.plugins import head_taps

# the teacher's sparse targets, as a teacher cache with top_k keeps them for `kd`
TOP_INDEX, TOP_LOG_PROB, TAIL = "@top_k_index", "@top_k_log_prob", "@top_k_tail"
# which kernel implementation computes the loss (compressor.cuda.kernels)
Impl = Literal["auto", "reference", "compiled", "chunked", "triton"]


class KDOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(4.0, gt=0)
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tv", "soft_ce"] = "forward_kl"
    beta: float = Field(0.5, ge=0, le=1, description="JSD mixing: 0 = forward KL, 1 = reverse KL")
    t2_scale: bool = Field(True, description="times T^2, so gradients keep their size as T grows")
    impl: Impl = "auto"
    fused_head: bool = Field(
        False,
        description="language models: compute the divergence from both lm_heads' inputs and "
        "weights chunk by chunk, never holding [tokens, vocab] logits (the fused_head pass)",
    )
    student: str = "output"
    teacher: str = "output"

    @model_validator(mode="after")
    def _fused_reads_the_heads(self) -> KDOptions:
        if self.fused_head and (self.student, self.teacher) != ("output", "output"):
            raise ValueError(
                "fused_head distils the models' own logits from their lm_heads; it takes no "
                "student or teacher tap (leave both as output)"
            )
        return self


class LogitKD(LossTerm[KDOptions]):
    """Logit distillation: T^2 * divergence(teacher || student) at temperature T (Hinton)."""

    name = "kd"

    def reads(self) -> dict[str, list[str]]:
        if self.options.fused_head:
            return {role: [head_taps.HIDDEN, head_taps.WEIGHT] for role in ("student", "teacher")}
        return {"student": [self.options.student], "teacher": [self.options.teacher]}

    per_token = False  # over [B, T, V] logits (or a fused head's [B, T, H] inputs)

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        o = self.options
        read = student_shapes[head_taps.HIDDEN if o.fused_head else o.student]
        self.per_token = read is not None and len(read) == 3
        if o.fused_head:  # head weights are [V, H]
            s, t = student_shapes[head_taps.WEIGHT], teacher_shapes[head_taps.WEIGHT]
            s, t = (shape[:1] if shape else None for shape in (s, t))
        else:
            s, t = student_shapes[o.student], teacher_shapes[o.teacher]
        if s and t and isinstance(s[-1], int) and isinstance(t[-1], int) and s[-1] != t[-1]:
            raise ValueError(
                f"loss 'kd': the student's {o.student!r} has {s[-1]} classes and the "
                f"teacher's {o.teacher!r} {t[-1]}: KD compares distributions over "
                "the same classes (for language models, the same vocabulary)"
            )

    def cached_teacher(
        self, teacher: dict[str, torch.Tensor], top_k: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
        """The teacher's logits as sparse targets: its k most likely classes at this term's
        temperature and the log-mass of the rest."""
        o, values = self.options, dict(teacher)
        if o.fused_head:
            hidden = values.pop(head_taps.HIDDEN)
            weight, bias = values.pop(head_taps.WEIGHT), values.pop(head_taps.BIAS, None)
            targets = sparse.top_k_targets(hidden, top_k, o.temperature, weight, bias)
        else:
            hidden = values.pop(o.teacher)
            targets = sparse.top_k_targets(hidden, top_k, o.temperature)
        values |= {TOP_INDEX: targets.classes, TOP_LOG_PROB: targets.log_prob, TAIL: targets.tail}
        tokens = (1,) if hidden.dim() == 3 else ()  # [B, T, ...]: dim 1 follows the tokens
        return values, dict.fromkeys((TOP_INDEX, TOP_LOG_PROB, TAIL), tokens)

    def units(self, batch: Any, target: torch.Tensor | None) -> torch.Tensor:
        if not self.per_token:
            return super().units(batch, target)
        return scored_positions(batch, target).sum().float()

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        o = self.options
        if TOP_LOG_PROB in inputs.teacher:
            return self._sparse(inputs)
        if o.fused_head:
            return self._fused(inputs)
        student = inputs.student[o.student]
        return kernels.divergence(
            student, inputs.teacher[o.teacher], **self._divergence(student, inputs), impl=o.impl
        )

    def _divergence(self, student: torch.Tensor, inputs: LossInputs) -> dict[str, Any]:
        """The divergence options every path shares, with the mask of the student's tokens."""
        o = self.options
        return dict(
            kind=o.divergence,
            beta=o.beta,
            temperature=o.temperature,
            t2_scale=o.t2_scale,
            mask=token_mask(student, inputs),
        )

    def _fused(self, inputs: LossInputs) -> torch.Tensor:
        s, t = inputs.student, inputs.teacher
        hidden = s[head_taps.HIDDEN]
        return kernels.linear_divergence(
            hidden,
            s[head_taps.WEIGHT],
            t[head_taps.HIDDEN],
            t[head_taps.WEIGHT],
            student_bias=s.get(head_taps.BIAS),
            teacher_bias=t.get(head_taps.BIAS),
            **self._divergence(hidden, inputs),
            impl=self.options.impl,
        )

    def _sparse(self, inputs: LossInputs) -> torch.Tensor:
        """Against the cached teacher's sparse targets (teacher_cache.top_k)."""
        o, s, t = self.options, inputs.student, inputs.teacher
        targets = sparse.SparseTargets(t[TOP_INDEX], t[TOP_LOG_PROB], t[TAIL])
        student = s[head_taps.HIDDEN] if o.fused_head else s[o.student]
        return sparse.sparse_divergence(
            student,
            targets,
            **self._divergence(student, inputs),
            weight=s[head_taps.WEIGHT] if o.fused_head else None,
            bias=s.get(head_taps.BIAS) if o.fused_head else None,
        )


def token_mask(logits: torch.Tensor, inputs: LossInputs) -> torch.Tensor | None:
    """Which positions of per-token logits [B, T, V] (or the hidden states [B, T, H] a fused
    head reads) count: those whose next token is scored
    (labels != -100: not padding, not prompt), else real tokens; None for [B, C] logits."""
    if logits.dim() != 3:
        return None
    target = inputs.target
    if target is not None and target.shape == logits.shape[:2]:
        return scored_positions(inputs.batch, target)
    if isinstance(inputs.batch, dict) and "attention_mask" in inputs.batch:
        return inputs.batch["attention_mask"].bool()
    return None


def scored_positions(batch: Any, target: torch.Tensor | None) -> torch.Tensor:
    """[B, T] positions a per-token term scores: those whose next token is a label, with
    per-token labels; else the real tokens; else every position."""
    if target is not None and target.dim() == 2:
        mask = torch.zeros_like(target, dtype=torch.bool)
        mask[:, :-1] = target[:, 1:] != IGNORE  # position t predicts token t + 1
        return mask
    if isinstance(batch, dict) and "attention_mask" in batch:
        return batch["attention_mask"].bool()
    ids = next(iter(batch.values())) if isinstance(batch, dict) else batch
    return torch.ones(ids.shape[:2], dtype=torch.bool, device=ids.device)


class CEOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    student: str = "output"


class CrossEntropy(LossTerm[CEOptions]):
    """Cross entropy of the student's logits against the ground-truth labels."""

    name = "ce"
    needs_teacher = False

    def reads(self) -> dict[str, list[str]]:
        return {"student": [self.options.student], "teacher": []}

    def units(self, batch: Any, target: torch.Tensor | None) -> torch.Tensor:
        """The labels it scores: next tokens for per-token labels, else the samples'."""
        if target is None:
            return super().units(batch, target)
        scored = target[:, 1:] if target.dim() == 2 else target
        return (scored != IGNORE).sum().float()

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        if inputs.target is None:
            raise ValueError("loss 'ce' needs labels, and this data has none")
        logits = inputs.student[self.options.student].float()
        target = inputs.target
        if logits.dim() == 3:  # next-token prediction: position t predicts token t + 1
            logits, target = logits[:, :-1].flatten(0, 1), target[:, 1:].flatten()
        return F.cross_entropy(
            logits, target, label_smoothing=self.options.label_smoothing, ignore_index=IGNORE
        )


class FeatureOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student: str = Field(description="module path of the student tap")
    teacher: str = Field(description="module path of the teacher tap")
    projection: Literal["auto", "none"] = "auto"
    align: Literal["auto", "grid", "pool"] = Field(
        "auto",
        description="features of different kinds: grid (conv maps and square token grids as "
        "maps), pool (both averaged to vectors); auto: grid when both are spatial, else pool",
    )
    impl: Impl = "auto"


def _spatial(shape: tuple[Any, ...]) -> bool:
    """A conv map (N, C, H, W), or tokens (N, L, D) on a square grid (after class tokens)."""
    if len(shape) == 4:
        return True
    return len(shape) == 3 and isinstance(shape[1], int) and token_grid(shape[1])[0] is not None


def _as_map(x: torch.Tensor) -> torch.Tensor:
    """Tokens (N, [cls +] side*side, D) as a map (N, D, side, side); maps unchanged."""
    if x.dim() == 4:
        return x
    side, cls = token_grid(x.shape[1])
    assert side is not None
    return x[:, cls:].transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


def _as_vector(x: torch.Tensor) -> torch.Tensor:
    """The mean over every position: (N, C, H, W) -> (N, C), (N, L, D) -> (N, D)."""
    if x.dim() == 4:
        return x.mean(dim=(2, 3))
    return x.mean(dim=1) if x.dim() == 3 else x


class _FeatureLoss(LossTerm[FeatureOptions]):
    """Shared by feature losses: a learned projection when the widths differ.

    Features are (N, C, ...) for conv maps (channel dim 1) and (N, ..., D) otherwise. Conv
    maps of different spatial size are average-pooled to the teacher's size. Features of
    different kinds are aligned first (`align`): a conv map and a square grid of tokens both
    become maps, anything else both become vectors (the mean over positions).
    """

    kernel_kind = "mse"

    def reads(self) -> dict[str, list[str]]:
        return {"student": [self.options.student], "teacher": [self.options.teacher]}

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        o = self.options
        s, t = student_shapes[o.student], teacher_shapes[o.teacher]
        if s is None or t is None or len(s) < 2 or len(t) < 2:
            raise ValueError(
                f"loss {self.name!r}: student {o.student!r} has shape {format_shape(s)} and "
                f"teacher {o.teacher!r} {format_shape(t)}; both must be batched features"
            )
        self.align = "none"
        if len(s) != len(t) or (o.align != "auto" and len(s) != 2):
            align = o.align
            if align == "auto":
                align = "grid" if _spatial(s) and _spatial(t) else "pool"
            if align == "grid" and not (_spatial(s) and _spatial(t)):
                raise ValueError(
                    f"loss {self.name!r}: align: grid needs conv maps (N, C, H, W) or square "
                    f"token grids (N, L, D); the student has {format_shape(s)} and the teacher "
                    f"{format_shape(t)} (align: pool compares their means)"
                )
            self.align = align
            s, t = (self._aligned_shape(shape) for shape in (s, t))
        self.conv = len(s) == 4
        self.feature_dim = 1 if self.conv else -1
        s_width, t_width = s[self.feature_dim], t[self.feature_dim]
        self.pool_to = tuple(t[2:]) if self.conv and tuple(s[2:]) != tuple(t[2:]) else None
        self.projection: nn.Module | None = None
        if s_width != t_width:
            if o.projection == "none":
                raise ValueError(
                    f"loss {self.name!r}: widths differ (student {s_width}, teacher {t_width}) "
                    "and projection is 'none'; set projection: auto"
                )
            self.projection = (
                nn.Conv2d(s_width, t_width, 1) if self.conv else nn.Linear(s_width, t_width)
            )

    def _aligned_shape(self, shape: tuple[Any, ...]) -> tuple[Any, ...]:
        if self.align == "pool":
            return (shape[0], shape[1] if len(shape) == 4 else shape[-1])
        if len(shape) == 4:
            return shape
        side, _ = token_grid(shape[1])
        return (shape[0], shape[2], side, side)

    def _aligned(self, x: torch.Tensor) -> torch.Tensor:
        if self.align == "grid":
            return _as_map(x)
        return _as_vector(x) if self.align == "pool" else x

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        s = self._aligned(inputs.student[self.options.student])
        t = self._aligned(inputs.teacher[self.options.teacher])
        if self.projection is not None:
            s = self.projection(s)
        if self.pool_to is not None:
            s = F.adaptive_avg_pool2d(s, self.pool_to)
        return kernels.feature_loss(
            s, t, kind=self.kernel_kind, dim=self.feature_dim, impl=self.options.impl
        )


class FeatureMSE(_FeatureLoss):
    """Mean squared error between student and teacher features (projected if widths differ)."""

    name = "feature_mse"
    kernel_kind = "mse"


class FeatureCosine(_FeatureLoss):
    """1 - cosine similarity of student and teacher features along the feature dimension."""

    name = "feature_cosine"
    kernel_kind = "cosine"


class FeatureL1(_FeatureLoss):
    """L1 distance between L2-normalised student and teacher features (DMAE's feature loss)."""

    name = "feature_l1"
    kernel_kind = "l1_normalized"


class OFALossOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(1.0, gt=0)
    eps: list[float] = Field([1.0], description="per branch exponent; one value applies to all")
    eps_final: float = Field(1.0, gt=0, description="exponent for the student's own logits")
    final_weight: float = Field(1.0, ge=0, description="w_kd: weight of the final-logit term")
    branch_weight: float = Field(1.0, ge=0, description="w_ofa: weight of the summed branch terms")
    t2_scale: bool = Field(False, description="times T^2 (off in the paper, which uses T = 1)")


def ofa_term(
    student: torch.Tensor,
    teacher: torch.Tensor,
    onehot: torch.Tensor,
    eps: float,
    temperature: float,
) -> torch.Tensor:
    """-sum_c [(p_t + m)^eps - m]_c log p_s,c, averaged over the batch (OFA-KD, eq. 6)."""
    log_p_s = F.log_softmax(student.float() / temperature, dim=-1)
    p_t = F.softmax(teacher.float() / temperature, dim=-1)
    target = (p_t + onehot).pow(eps) - onehot
    return -(target * log_p_s).sum(-1).mean()


class OFALoss(LossTerm[OFALossOptions]):
    """OFA-KD with adaptive target enhancement, on the final logits and every `@ofa` branch."""

    name = "ofa"

    def reads(self) -> dict[str, list[str]]:
        return {"student": ["output", "@ofa"], "teacher": ["output"]}

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        o = self.options
        if inputs.target is None:
            raise ValueError("loss 'ofa' needs labels, and this data has none")
        teacher = inputs.teacher["output"]
        onehot = F.one_hot(inputs.target, teacher.shape[-1]).float()
        branches = inputs.student["@ofa"]  # [stages, N, classes]
        eps = o.eps * len(branches) if len(o.eps) == 1 else o.eps
        if len(eps) != len(branches):
            raise ValueError(f"loss 'ofa': {len(o.eps)} eps values for {len(branches)} branches")
        loss = o.final_weight * ofa_term(
            inputs.student["output"], teacher, onehot, o.eps_final, o.temperature
        )
        for branch, e in zip(branches, eps, strict=True):
            loss = loss + o.branch_weight * ofa_term(branch, teacher, onehot, e, o.temperature)
        return loss * (o.temperature**2 if o.t2_scale else 1.0)


@hookimpl
def compressor_losses() -> list[type]:
    return [LogitKD, CrossEntropy, FeatureMSE, FeatureCosine, FeatureL1, OFALoss]
