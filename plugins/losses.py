"""Built-in loss terms: Hinton logit KD, ground-truth cross entropy, feature MSE and cosine."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from compressor.cuda.kernels import kernel
from compressor.hookspecs import hookimpl
from compressor.losses import LossInputs, LossTerm, Shapes


class KDOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(4.0, gt=0)
    student: str = "output"
    teacher: str = "output"


class LogitKD(LossTerm):
    """Hinton logit distillation: T^2 * KL(teacher || student) at temperature T."""

    name = "kd"
    Options = KDOptions

    def reads(self) -> dict[str, list[str]]:
        return {"student": [self.options.student], "teacher": [self.options.teacher]}

    def forward(self, inputs: LossInputs) -> torch.Tensor:  # type: ignore[override]
        o = self.options
        return kernel("kl_divergence")(
            inputs.student[o.student], inputs.teacher[o.teacher], o.temperature
        )


class CEOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    student: str = "output"


class CrossEntropy(LossTerm):
    """Cross entropy of the student's logits against the ground-truth labels."""

    name = "ce"
    Options = CEOptions
    needs_teacher = False

    def reads(self) -> dict[str, list[str]]:
        return {"student": [self.options.student], "teacher": []}

    def forward(self, inputs: LossInputs) -> torch.Tensor:  # type: ignore[override]
        if inputs.target is None:
            raise ValueError("loss 'ce' needs labels, and this data has none")
        logits = inputs.student[self.options.student].float()
        return F.cross_entropy(logits, inputs.target, label_smoothing=self.options.label_smoothing)


class FeatureOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student: str = Field(description="module path of the student tap")
    teacher: str = Field(description="module path of the teacher tap")
    projection: Literal["auto", "none"] = "auto"


class _FeatureLoss(LossTerm):
    """Shared by feature losses: a learned projection when the widths differ.

    Features are (N, C, ...) for conv maps (channel dim 1) and (N, ..., D) otherwise.
    Conv maps of different spatial size are average-pooled to the teacher's size.
    """

    Options = FeatureOptions

    def reads(self) -> dict[str, list[str]]:
        return {"student": [self.options.student], "teacher": [self.options.teacher]}

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        s = student_shapes[self.options.student]
        t = teacher_shapes[self.options.teacher]
        if s is None or t is None or len(s) != len(t):
            raise ValueError(
                f"loss {self.name!r}: student {self.options.student!r} has shape {s} and teacher "
                f"{self.options.teacher!r} has shape {t}; both must be tensors of the same rank"
            )
        self.conv = len(s) == 4
        self.feature_dim = 1 if self.conv else -1
        s_width, t_width = s[self.feature_dim], t[self.feature_dim]
        self.pool_to = tuple(t[2:]) if self.conv and tuple(s[2:]) != tuple(t[2:]) else None
        self.projection: nn.Module | None = None
        if s_width != t_width:
            if self.options.projection == "none":
                raise ValueError(
                    f"loss {self.name!r}: widths differ (student {s_width}, teacher {t_width}) "
                    "and projection is 'none'; set projection: auto"
                )
            self.projection = (
                nn.Conv2d(s_width, t_width, kernel_size=1)
                if self.conv
                else nn.Linear(s_width, t_width)
            )

    def aligned(self, inputs: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
        s = inputs.student[self.options.student]
        t = inputs.teacher[self.options.teacher]
        if self.projection is not None:
            s = self.projection(s)
        if self.pool_to is not None:
            s = F.adaptive_avg_pool2d(s, self.pool_to)
        return s, t


class FeatureMSE(_FeatureLoss):
    """Mean squared error between student and teacher features (projected if widths differ)."""

    name = "feature_mse"

    def forward(self, inputs: LossInputs) -> torch.Tensor:  # type: ignore[override]
        return kernel("feature_mse")(*self.aligned(inputs))


class FeatureCosine(_FeatureLoss):
    """1 - cosine similarity of student and teacher features along the feature dimension."""

    name = "feature_cosine"

    def forward(self, inputs: LossInputs) -> torch.Tensor:  # type: ignore[override]
        return kernel("feature_cosine")(*self.aligned(inputs), dim=self.feature_dim)


@hookimpl
def compressor_losses() -> list[type]:
    return [LogitKD, CrossEntropy, FeatureMSE, FeatureCosine]
