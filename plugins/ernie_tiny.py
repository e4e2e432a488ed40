"""`ernie_tiny`: ERNIE-Tiny's four-stage schedule as a stage preset (Su et al., "ERNIE-Tiny:
A Progressive Distillation Framework for Pretrained Transformer Compression", 2021).

From two teachers and two datasets it makes: general distillation (pretrained teacher,
general data), general-enhanced distillation (fine-tuned teacher, general data),
task-adaptive distillation (fine-tuned teacher, task data) and task-specific distillation
(adds soft-label KD and hard-label CE). The teacher, data and losses change stage by stage;
the student carries over.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from compressor.api import (
    DataSpec,
    KeyPath,
    LossSpec,
    ModelSpec,
    PresetStage,
    StagePreset,
    hookimpl,
)

# (stage, teacher option, data option, adds the label losses)
STAGES = [
    ("general", "general_teacher", "general_data", False),
    ("general-enhanced", "task_teacher", "general_data", False),
    ("task-adaptive", "task_teacher", "task_data", False),
    ("task-specific", "task_teacher", "task_data", True),
]


class ErnieTinyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    general_teacher: ModelSpec = Field(description="the pretrained teacher")
    task_teacher: ModelSpec = Field(description="the teacher fine-tuned on the task")
    general_data: DataSpec
    task_data: DataSpec
    feature_losses: list[LossSpec] = Field(min_length=1, description="every stage")
    label_losses: list[LossSpec] = Field(
        default_factory=lambda: [LossSpec(name="kd"), LossSpec(name="ce")],
        description="added in the task-specific stage",
    )
    steps: list[int] = Field(min_length=4, max_length=4, description="steps of each stage")
    only: list[str] | None = Field(
        None, description="run only these stages (e.g. [task-specific] for a one-stage arm)"
    )

    @field_validator("only")
    @classmethod
    def _known_stages(cls, only: list[str] | None) -> list[str] | None:
        names = [name for name, *_ in STAGES]
        unknown = [n for n in only or [] if n not in names]
        if unknown or only == []:
            raise ValueError(f"unknown stages {unknown or only}; the stages are {', '.join(names)}")
        return only


def _dump(spec: BaseModel) -> dict[str, Any]:
    return spec.model_dump(exclude_unset=True)


class ErnieTiny(StagePreset[ErnieTinyOptions]):
    """ERNIE-Tiny's four stages: general, general-enhanced, task-adaptive, task-specific."""

    name = "ernie_tiny"

    def expand(self) -> list[PresetStage]:
        o = self.options
        out = []
        for i, (name, teacher, data, labels) in enumerate(STAGES):
            if o.only is not None and name not in o.only:
                continue
            losses = o.feature_losses + (o.label_losses if labels else [])
            stage = {
                "name": name,
                "teacher": _dump(getattr(o, teacher)),
                "data": _dump(getattr(o, data)),
                "losses": [_dump(loss) for loss in losses],
                "steps": o.steps[i],
            }
            written: dict[KeyPath, KeyPath] = {
                ("teacher",): (teacher,),
                ("data",): (data,),
                ("losses",): ("feature_losses",),
                ("steps",): ("steps", i),
            }
            for j in range(len(o.feature_losses)):
                written[("losses", j)] = ("feature_losses", j)
            for j in range(len(losses) - len(o.feature_losses)):
                written[("losses", len(o.feature_losses) + j)] = ("label_losses", j)
            out.append(PresetStage(stage, written))
        return out


@hookimpl
def compressor_stage_presets() -> list[type]:
    return [ErnieTiny]
