"""Loss terms for transformers: hidden states over a layer map and attention distributions
(TinyBERT, MiniLM), pooled sentence embeddings (sentence encoders). Padding never counts:
every term masks with the batch's attention_mask.

A layer map pairs student block i with a teacher block. `uniform` pairs the last student
block with the last teacher block and spaces the rest evenly (TinyBERT's mapping); an
explicit map is `{student index: teacher index}`. Module paths are templates with `{}` for
the block index, e.g. `encoder.layer.{}`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from compressor.api import LossInputs, LossTerm, Shapes, hookimpl
from compressor.plugins.hf import mean_pool


def uniform_layer_map(student_depth: int, teacher_depth: int) -> dict[int, int]:
    """Student block i -> teacher block round((i + 1) * T / S) - 1."""
    return {i: round((i + 1) * teacher_depth / student_depth) - 1 for i in range(student_depth)}


class LayerMapOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student: str = Field(description="student path template, e.g. encoder.layer.{}")
    teacher: str = Field(description="teacher path template, e.g. encoder.layer.{}")
    layer_map: Literal["uniform"] | dict[int, int] = "uniform"
    student_depth: int | None = Field(None, gt=0, description="student blocks (uniform map)")
    teacher_depth: int | None = Field(None, gt=0, description="teacher blocks (uniform map)")

    @model_validator(mode="after")
    def _complete(self) -> LayerMapOptions:
        for name in ("student", "teacher"):
            if "{}" not in getattr(self, name):
                raise ValueError(f"{name}: the path template needs {{}} for the block index")
        if self.layer_map == "uniform" and (
            self.student_depth is None or self.teacher_depth is None
        ):
            raise ValueError("layer_map: uniform needs student_depth and teacher_depth")
        return self

    def pairs(self) -> list[tuple[str, str]]:
        mapping = (
            uniform_layer_map(self.student_depth or 0, self.teacher_depth or 0)
            if self.layer_map == "uniform"
            else self.layer_map
        )
        return [
            (self.student.format(s), self.teacher.format(t)) for s, t in sorted(mapping.items())
        ]


def _token_mask(inputs: LossInputs, reference: torch.Tensor) -> torch.Tensor:
    """[B, T] float mask of real tokens (all ones for inputs without an attention_mask)."""
    batch = inputs.batch
    if isinstance(batch, dict) and "attention_mask" in batch:
        return batch["attention_mask"].to(reference.dtype)
    return torch.ones(reference.shape[:2], dtype=reference.dtype, device=reference.device)


class _LayerMapLoss(LossTerm[LayerMapOptions]):
    """A loss over the (student, teacher) module pairs of a layer map."""

    def reads(self) -> dict[str, list[str]]:
        pairs = self.options.pairs()
        return {"student": [s for s, _ in pairs], "teacher": [t for _, t in pairs]}

    def units(self, batch: Any, target: torch.Tensor | None) -> torch.Tensor:
        """Real tokens: every pair's value is a mean over them."""
        if isinstance(batch, dict) and "attention_mask" in batch:
            return batch["attention_mask"].sum().float()
        return super().units(batch, target)


class HiddenMSE(_LayerMapLoss):
    """Mean squared error of hidden states over a layer map, averaged over real tokens;
    a learned projection per pair when widths differ."""

    name = "hidden_mse"

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        self.projections = nn.ModuleList()
        for s, t in self.options.pairs():
            s_shape, t_shape = student_shapes[s], teacher_shapes[t]
            if s_shape is None or t_shape is None or len(s_shape) != 3 or len(t_shape) != 3:
                raise ValueError(
                    f"loss 'hidden_mse': {s!r} has shape {s_shape} and {t!r} has shape {t_shape}; "
                    "both must be token states [batch, tokens, width]"
                )
            width_s, width_t = s_shape[-1], t_shape[-1]
            self.projections.append(
                nn.Identity() if width_s == width_t else nn.Linear(width_s, width_t)
            )

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        total = torch.zeros((), device=next(iter(inputs.student.values())).device)
        pairs = self.options.pairs()
        for (s, t), projection in zip(pairs, self.projections, strict=True):
            student = projection(inputs.student[s].float())
            teacher = inputs.teacher[t].float()
            mask = _token_mask(inputs, teacher)
            per_token = (student - teacher).pow(2).mean(-1)
            total = total + (per_token * mask).sum() / mask.sum().clamp(min=1)
        return total / len(pairs)


class AttentionKL(_LayerMapLoss):
    """KL(teacher || student) of attention distributions over a layer map (TinyBERT, MiniLM),
    over real query tokens. Taps are `...:softmax` nodes; head counts must match."""

    name = "attention_kl"

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        for s, t in self.options.pairs():
            s_shape, t_shape = student_shapes[s], teacher_shapes[t]
            if s_shape is None or t_shape is None or len(s_shape) != 4 or len(t_shape) != 4:
                raise ValueError(
                    f"loss 'attention_kl': {s!r} has shape {s_shape} and {t!r} has shape "
                    f"{t_shape}; both must be attention probabilities [batch, heads, query, key] "
                    "(tap `<attention module>:softmax` with eager attention)"
                )
            if s_shape[1] != t_shape[1]:
                raise ValueError(
                    f"loss 'attention_kl': the student has {s_shape[1]} heads at {s!r} and the "
                    f"teacher {t_shape[1]} at {t!r}; attention KL needs equal head counts"
                )

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        total = torch.zeros((), device=next(iter(inputs.student.values())).device)
        pairs = self.options.pairs()
        for s, t in pairs:
            p_s = inputs.student[s].float().clamp(min=1e-12)
            p_t = inputs.teacher[t].float()
            kl = (p_t * (p_t.clamp(min=1e-12).log() - p_s.log())).sum(-1)  # [B, H, Q]
            mask = _token_mask(inputs, p_t)[:, None, :]  # real query tokens
            total = total + (kl * mask).sum() / (mask.sum() * kl.shape[1]).clamp(min=1)
        return total / len(pairs)


class EmbeddingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student: str = Field("output", description="token states [batch, tokens, width]")
    teacher: str = "output"


class _EmbeddingLoss(LossTerm[EmbeddingOptions]):
    """Compare mean-pooled sentence embeddings (sentence-transformers pooling)."""

    def reads(self) -> dict[str, list[str]]:
        return {"student": [self.options.student], "teacher": [self.options.teacher]}

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        s, t = student_shapes[self.options.student], teacher_shapes[self.options.teacher]
        if s is None or t is None or len(s) != 3 or len(t) != 3:
            raise ValueError(
                f"loss {self.name!r}: student shape {s}, teacher shape {t}; both must be token "
                "states [batch, tokens, width] to pool"
            )
        self.projection: nn.Module = nn.Identity() if s[-1] == t[-1] else nn.Linear(s[-1], t[-1])

    def pooled(self, inputs: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
        mask = _token_mask(inputs, inputs.teacher[self.options.teacher])
        student = mean_pool(inputs.student[self.options.student].float(), mask)
        teacher = mean_pool(inputs.teacher[self.options.teacher].float(), mask)
        return self.projection(student), teacher


class EmbeddingCosine(_EmbeddingLoss):
    """1 - cosine similarity of student and teacher sentence embeddings."""

    name = "embedding_cosine"

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        student, teacher = self.pooled(inputs)
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


class EmbeddingMSE(_EmbeddingLoss):
    """Mean squared error of student and teacher sentence embeddings."""

    name = "embedding_mse"

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        student, teacher = self.pooled(inputs)
        return F.mse_loss(student, teacher)


@hookimpl
def compressor_losses() -> list[type]:
    return [HiddenMSE, AttentionKL, EmbeddingCosine, EmbeddingMSE]
