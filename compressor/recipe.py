"""The recipe: YAML parsed into typed objects, every error located at file:line:column.

Components named in a recipe (loaders, passes, losses, optimizers, exporters) are plugins, so
their options are validated in a second step, when the plan is built, against the options
model each plugin declares (`compressor.registry.Registry.create`). Reading a recipe file
(overrides, stage presets) is `compressor.recipe_file.load_recipe`.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from compressor.components import Component, OptionsT
from compressor.errors import Location, RecipeError
from compressor.yaml_positions import KeyPath, SourceMap, format_path

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class Strict(BaseModel):
    """A recipe section: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")


class ComponentSpec(BaseModel):
    """`name` picks a registered plugin component; the other keys are that component's options."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class LossSpec(ComponentSpec):
    weight: float | None = Field(
        None,
        ge=0,
        description="default: the term's own (1 for most; 0.01 for moe_balance); a negative "
        "weight would maximise the term, which diverges",
    )


class PassSpec(ComponentSpec):
    target: Literal["student", "teacher", "both"] = "student"


class ModelSpec(BaseModel):
    """`loader` picks a registered model loader; the other keys are that loader's options
    (e.g. `model`, `kwargs`, `weights` for `callable`). A student may instead be a copy of
    the teacher (`from_teacher`), which module passes then shrink."""

    model_config = ConfigDict(extra="allow")
    loader: str = "callable"
    from_teacher: bool = Field(
        False, description="student: start as a copy of the teacher (module passes shrink it)"
    )

    @model_validator(mode="before")
    @classmethod
    def _recipe_shorthand(cls, data: Any) -> Any:
        """`{recipe: finetune.yaml}` is the `recipe` loader: another recipe's trained student."""
        if isinstance(data, dict) and "recipe" in data and "loader" not in data:
            return {"loader": "recipe", **data}
        return data

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataSpec(Strict):
    loader: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(256, gt=0)
    # Training batches of texts of similar length, which pad little (see batch_indices).
    group_by_length: bool = False


class CaptureSpec(Strict):
    method: Literal["auto", "export", "symbolic_trace"] = "auto"


class DivergenceGuard(Strict):
    """Training stops when a step's loss is over `factor` times the median of the `window`
    steps before it, over the first step's loss and over `floor`, or when the gradient norm
    is not finite."""

    factor: float = Field(100.0, gt=1)
    window: int = Field(100, ge=5)
    floor: float = Field(
        1.0,
        ge=0,
        description="a loss at or below this is never called diverged: a student that starts "
        "as a copy of its teacher has a loss near 0, and a ratio to a median near 0 says nothing",
    )


class DistributedSpec(Strict):
    """How the ranks of a torchrun launch share the work (ignored by a one-process run)."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every rank holds the whole student and teacher; fsdp: FSDP2 shards "
        "the student, its optimizer state and the frozen teacher across the ranks",
    )
    teacher_reshard: bool = Field(
        True,
        description="fsdp: free the teacher's gathered weights after each forward (it has no "
        "backward, so kept weights would hold the whole teacher on every rank)",
    )
    timeout_s: float = Field(1800, gt=0, description="how long a rank waits for the others")


class TrainSpec(Strict):
    steps: int = Field(gt=0)
    grad_accum: int = Field(
        1, gt=0, description="micro-batches per step: the same step in less memory"
    )
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    optimizer: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="adamw"))
    schedule: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="constant"))
    grad_clip: float | None = Field(None, gt=0)
    trainable: list[str] | None = Field(
        None,
        description="glob patterns of the student parameters to train (`*.mlp.experts.*`); "
        "the rest stay frozen and out of the optimizer. Default: all",
    )
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(100, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    divergence: DivergenceGuard | None = Field(
        default_factory=lambda: DivergenceGuard(),
        description="stop a run whose loss blows up; null turns the guard off",
    )

    @field_validator("divergence", mode="before")
    @classmethod
    def _guard_off(cls, value: Any) -> Any:
        return None if value is False else value


class ReportSpec(Strict):
    baseline: bool = False
    export_teacher: bool = Field(
        True,
        description="also export, verify and time the whole teacher with every exporter (the "
        "deployment table's 'vs teacher' column); false writes the student's artifacts only",
    )
    latency_batches: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [1, 32])
    latency_repeats: int = Field(50, gt=0)
    latency_tokens: int | None = Field(
        None, gt=1, description="text models: time inputs of exactly this many tokens"
    )


class TeacherCacheSpec(Strict):
    """The frozen teacher's outputs on the (fixed) training data, computed once per sample and
    read back by later epochs instead of running the teacher."""

    top_k: int | None = Field(
        None,
        gt=0,
        description="keep only the teacher's k most likely classes per token, plus the mass of "
        "the rest (for kd on language models); null keeps what the losses read whole",
    )
    memory_mb: float = Field(
        4096, gt=0, description="samples past this size are not cached (they run the teacher)"
    )


STAGE_KEYS = ("teacher", "data", "losses", "train")


class StageSpec(Strict):
    """One stage of a staged schedule: what it sets replaces the recipe's
    own teacher, data, losses or train settings for that stage; the student carries over."""

    name: str
    teacher: ModelSpec | None = None
    data: DataSpec | None = None
    losses: list[LossSpec] | None = Field(None, min_length=1)
    train: TrainSpec | None = None
    steps: int | None = Field(None, gt=0, description="steps, with the recipe's train settings")


class Recipe(Strict):
    name: str = "run"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output: str | None = Field(None, description="run folder; default runs/<name>")
    teacher: ModelSpec | None = None
    student: ModelSpec
    data: DataSpec
    capture: CaptureSpec = Field(default_factory=lambda: CaptureSpec())
    module_passes: list[PassSpec] = Field(default_factory=list)
    passes: list[PassSpec] = Field(default_factory=list)
    losses: list[LossSpec] = Field(min_length=1)
    train: TrainSpec
    teacher_cache: TeacherCacheSpec | None = None
    export: list[ComponentSpec] = Field(default_factory=lambda: [ComponentSpec(name="onnx")])
    report: ReportSpec = Field(default_factory=lambda: ReportSpec())
    stages: list[StageSpec] | None = Field(
        None, description="a staged schedule: a list of stages, or {preset: NAME, ...}"
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not RUN_NAME.fullmatch(name) or name in (".", ".."):
            raise ValueError(
                f"name {name!r} is not a plain name: letters, digits, '.', '_' and '-', no "
                "path separators; the run folder is runs/<name>, and output: picks any other "
                "folder"
            )
        return name

    @field_validator("stages")
    @classmethod
    def _some_stages(cls, stages: Any) -> Any:
        if stages == []:
            raise ValueError("stages: give at least one stage, or leave stages out")
        return stages

    _path: Path = PrivateAttr(default=Path("recipe.yaml"))
    _source: SourceMap = PrivateAttr(default_factory=lambda: SourceMap("recipe.yaml"))

    @property
    def path(self) -> Path:
        return self._path

    @property
    def source(self) -> SourceMap:
        return self._source

    def resolve(self, relative: str) -> Path:
        """Files named in a recipe are relative to the recipe's folder."""
        path = Path(relative).expanduser()
        return path if path.is_absolute() else (self._path.parent / path)

    def run_dir(self) -> Path:
        """Run folders are relative to the working directory, like torchtune's output_dir."""
        return Path(self.output) if self.output else Path("runs") / self.name

    def locate(self, path: KeyPath, prefer_key: bool = False) -> Location:
        return self._source.locate(path, prefer_key)

    def stage_views(self) -> list[tuple[str, Recipe]]:
        """(stage name, the recipe as that stage sees it); one unnamed stage when unstaged.

        A stage's view replaces the teacher, data, losses and train settings; errors in them
        are located where the stage wrote them."""
        if self.stages is None:
            return [("", self)]
        views = []
        for i, stage in enumerate(self.stages):
            update = {k: getattr(stage, k) for k in STAGE_KEYS if getattr(stage, k) is not None}
            aliases: dict[KeyPath, KeyPath] = {(k,): ("stages", i, k) for k in update}
            if stage.steps is not None:
                train = update.get("train", self.train)
                update["train"] = train.model_copy(update={"steps": stage.steps})
                aliases[("train", "steps")] = ("stages", i, "steps")
            view = self.model_copy(update=update)
            view._path = self._path
            view._source = replace(self._source, aliases={**self._source.aliases, **aliases})
            views.append((stage.name, view))
        return views


class PresetStage(NamedTuple):
    """One stage a preset expands into: the stage as a recipe would write it, and for each
    key path inside it, where in the preset the user wrote that part (for error locations)."""

    stage: dict[str, Any]
    written_at: dict[KeyPath, KeyPath]


class StagePreset(Component[OptionsT]):
    """A named staged schedule: `stages: {preset: NAME, ...options}` in a recipe. The options
    are the preset's `Options`; `expand` turns them into stages, as if the user had written
    `stages: [...]`."""

    def expand(self) -> list[PresetStage]:
        raise NotImplementedError


def validation_errors(
    exc: ValidationError, source: SourceMap, prefix: KeyPath, model: type[BaseModel]
) -> list[RecipeError]:
    """Pydantic errors of a sub-model validated at `prefix`, located in the recipe."""
    out = []
    for error in exc.errors():
        located = {**error, "loc": (*prefix, *error["loc"])}
        out.append(to_recipe_error(located, source, model, len(prefix)))
    return out


def did_you_mean(word: str, choices: list[str] | set[str] | typing.KeysView[str]) -> str:
    """A suggestion for a misspelt name: close spelling, or one name containing the other."""
    options = list(choices)
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if not close:
        close = [c for c in options if len(c) >= 2 and (c in word or word in c)][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


def to_recipe_error(
    error: Any, source: SourceMap, model: type[BaseModel], skip: int = 0
) -> RecipeError:
    loc: KeyPath = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        allowed = sorted(_fields_at(model, loc[skip:-1]))
        return RecipeError(
            source.locate(loc, prefer_key=True),
            f"unknown key {key!r}{did_you_mean(key, allowed)}",
            ", ".join(allowed) if allowed else None,
        )
    if kind == "missing":
        return RecipeError(
            source.locate(loc[:-1], prefer_key=True),
            f"missing required key {format_path(loc)!r}",
        )
    got = error.get("input")
    shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
    return RecipeError(source.locate(loc), f"{error['msg']}{shown}")


def _fields_at(model: type[BaseModel], path: KeyPath) -> set[str]:
    """Field names allowed at `path` inside `model`, following nested models and lists."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return set()
        field = current.model_fields.get(str(part))
        if field is None:
            return set()
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return set(current.model_fields)
    return set()


def _model_in(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if isinstance(found, type) and issubclass(found, BaseModel):
                return found
        return None
    return annotation
