"""Built-in optimizers (adamw, adam, sgd) and schedules (constant, cosine, linear)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from compressor.api import OptimizerFactory, ScheduleFactory, hookimpl

# torch's fused kernels update every parameter in one op call, where its default on a CPU
# takes a few per parameter (AdamW on the engine bench's 2-layer MLP: 80 us a step, not 187)
FUSED_DEVICES = ("cpu", "cuda")


class AdamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    fused: bool | None = None  # None: fused where every parameter allows it


class SGDOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    nesterov: bool = False
    fused: bool | None = None  # None: fused where every parameter allows it


def _fused(choice: bool | None, params: list[torch.nn.Parameter]) -> bool | None:
    """The `fused` argument for torch: the recipe's choice, else fused when every parameter
    is a floating-point tensor on a device with fused kernels (None: torch's default)."""
    if choice is not None:
        return choice
    fits = all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)
    return True if params and fits else None


class _AdamFamily(OptimizerFactory[AdamOptions]):
    torch_class: ClassVar[type[torch.optim.Adam] | type[torch.optim.AdamW]]

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        o, params = self.options, list(params)
        return self.torch_class(
            params,
            lr=o.lr,
            weight_decay=o.weight_decay,
            betas=o.betas,
            fused=_fused(o.fused, params),
        )


class AdamW(_AdamFamily):
    """AdamW (decoupled weight decay)."""

    name = "adamw"
    torch_class = torch.optim.AdamW


class Adam(_AdamFamily):
    """Adam (L2 weight decay)."""

    name = "adam"
    torch_class = torch.optim.Adam


class SGD(OptimizerFactory[SGDOptions]):
    """SGD with momentum."""

    name = "sgd"

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        o, params = self.options, list(params)
        return torch.optim.SGD(
            params,
            lr=o.lr,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            nesterov=o.nesterov,
            fused=_fused(o.fused, params),
        )


class WarmupOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    warmup_steps: int = Field(0, ge=0)


def _warmup(step: int, warmup_steps: int) -> float | None:
    return (step + 1) / warmup_steps if step < warmup_steps else None


class Constant(ScheduleFactory[WarmupOptions]):
    """Constant learning rate after an optional linear warmup."""

    name = "constant"

    def factor(self, step: int, total_steps: int) -> float:
        return _warmup(step, self.options.warmup_steps) or 1.0

    def constant(self) -> bool:
        return self.options.warmup_steps == 0


class Cosine(ScheduleFactory[WarmupOptions]):
    """Cosine decay to zero after an optional linear warmup."""

    name = "cosine"

    def factor(self, step: int, total_steps: int) -> float:
        warm = self.options.warmup_steps
        if (w := _warmup(step, warm)) is not None:
            return w
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Linear(ScheduleFactory[WarmupOptions]):
    """Linear decay to zero after an optional linear warmup."""

    name = "linear"

    def factor(self, step: int, total_steps: int) -> float:
        warm = self.options.warmup_steps
        if (w := _warmup(step, warm)) is not None:
            return w
        return max(0.0, 1.0 - (step - warm) / max(1, total_steps - warm))


@hookimpl
def compressor_optimizers() -> list[type]:
    return [AdamW, Adam, SGD]


@hookimpl
def compressor_schedules() -> list[type]:
    return [Constant, Cosine, Linear]
