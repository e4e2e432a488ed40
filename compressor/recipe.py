"""The recipe: YAML parsed into typed objects, every error located at file:line:column.

Components named in a recipe (losses, passes, loaders, exporters, optimizers) are plugins, so
their options are validated in a second step against the options model each plugin declares
(see `compressor.registry.Registry.bind`).
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from compressor.errors import Location, RecipeError, RecipeErrors
from compressor.yaml_positions import KeyPath, SourceMap, format_path, load_yaml


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
    weight: float = 1.0


class PassSpec(ComponentSpec):
    target: Literal["student", "teacher", "both"] = "student"


class PackageRef(Strict):
    """A folder shipped inside an installed Python package (models on PyPI)."""

    package: str
    path: str = ""


class ModelSpec(Strict):
    loader: str = "callable"
    model: str | PackageRef | None = Field(
        None,
        description="callable: module:function or file.py:function; "
        "hf: a model folder, a .gguf file, or {package, path}",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = Field(None, description="a .safetensors file (never a pickle)")
    task: Literal["feature-extraction", "sequence-classification", "causal-lm"] = Field(
        "feature-extraction", description="hf: which head the model is loaded with"
    )
    from_teacher: bool = Field(
        False, description="student: start as a copy of the teacher (module passes shrink it)"
    )


class DataSpec(Strict):
    loader: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(256, gt=0)


class CaptureSpec(Strict):
    method: Literal["auto", "export", "symbolic_trace"] = "auto"


class TrainSpec(Strict):
    steps: int = Field(gt=0)
    optimizer: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="adamw"))
    schedule: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="constant"))
    grad_clip: float | None = Field(None, gt=0)
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(100, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, gt=0)


class ReportSpec(Strict):
    baseline: bool = False
    latency_batches: list[int] = Field(default_factory=lambda: [1, 32])
    latency_repeats: int = Field(50, gt=0)
    latency_tokens: int | None = Field(
        None, gt=1, description="text models: time inputs of exactly this many tokens"
    )


class StageSpec(Strict):
    """One stage of a staged schedule (ERNIE-Tiny): what it sets replaces the recipe's own
    teacher, data, losses or train settings for that stage; the student carries over."""

    name: str
    teacher: ModelSpec | None = None
    data: DataSpec | None = None
    losses: list[LossSpec] | None = Field(None, min_length=1)
    train: TrainSpec | None = None
    steps: int | None = Field(None, gt=0, description="steps, with the recipe's train settings")


# (stage, teacher field, data field, adds the label losses)
ERNIE_TINY_STAGES = [
    ("general", "general_teacher", "general_data", False),
    ("general-enhanced", "task_teacher", "general_data", False),
    ("task-adaptive", "task_teacher", "task_data", False),
    ("task-specific", "task_teacher", "task_data", True),
]


class ErnieTinyPreset(Strict):
    """ERNIE-Tiny's four stages from two teachers and two datasets (Su et al., 2021):
    general distillation (pretrained teacher, general data), general-enhanced (fine-tuned
    teacher, general data), task-adaptive (fine-tuned teacher, task data), task-specific
    (adds soft-label KD and hard-label CE)."""

    preset: Literal["ernie_tiny"]
    general_teacher: ModelSpec
    task_teacher: ModelSpec
    general_data: DataSpec
    task_data: DataSpec
    feature_losses: list[LossSpec] = Field(min_length=1)
    label_losses: list[LossSpec] = Field(
        default_factory=lambda: [LossSpec(name="kd"), LossSpec(name="ce")]
    )
    steps: list[int] = Field(min_length=4, max_length=4)
    only: list[str] | None = Field(
        None, description="run only these stages (e.g. [task-specific] for a one-stage arm)"
    )

    @field_validator("only")
    @classmethod
    def _known_stages(cls, only: list[str] | None) -> list[str] | None:
        names = [name for name, *_ in ERNIE_TINY_STAGES]
        unknown = [n for n in only or [] if n not in names]
        if unknown or only == []:
            raise ValueError(f"unknown stages {unknown or only}; the stages are {', '.join(names)}")
        return only

    def stages(self) -> list[tuple[StageSpec, dict[str, KeyPath]]]:
        """The four stages, each with where its parts are written in the recipe."""
        out = []
        for i, (name, teacher, data, labels) in enumerate(ERNIE_TINY_STAGES):
            if self.only is not None and name not in self.only:
                continue
            losses = self.feature_losses + (self.label_losses if labels else [])
            stage = StageSpec(
                name=name,
                teacher=getattr(self, teacher),
                data=getattr(self, data),
                losses=losses,
                steps=self.steps[i],
            )
            where: dict[str, KeyPath] = {
                "teacher": ("stages", teacher),
                "data": ("stages", data),
                "losses": ("stages", "label_losses" if labels else "feature_losses"),
                "train": ("stages", "steps", i),
            }
            out.append((stage, where))
        return out


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
    export: list[ComponentSpec] = Field(default_factory=lambda: [ComponentSpec(name="onnx")])
    report: ReportSpec = Field(default_factory=lambda: ReportSpec())
    stages: list[StageSpec] | ErnieTinyPreset | None = Field(
        None, description="a staged schedule: a list of stages, or a preset"
    )

    @field_validator("stages")
    @classmethod
    def _some_stages(cls, stages: Any) -> Any:
        if stages == []:
            raise ValueError("stages: give at least one stage, or leave stages out")
        return stages

    @model_validator(mode="before")
    @classmethod
    def _defaults_from_first_stage(cls, data: Any) -> Any:
        """A staged recipe may leave out data, losses and train: the first stage's serve."""
        if not isinstance(data, dict) or not data.get("stages"):
            return data
        stages = data["stages"]
        if isinstance(stages, dict):  # a preset
            steps = stages.get("steps")
            first = {
                "data": stages.get("general_data"),
                "losses": stages.get("feature_losses"),
                "train": {"steps": steps[0]} if isinstance(steps, list) and steps else None,
            }
        elif isinstance(stages, list) and isinstance(stages[0], dict):
            first = stages[0]
        else:
            return data
        filled = dict(data)
        for key in ("data", "losses", "train"):
            if key not in filled and first.get(key) is not None:
                filled[key] = first[key]
        return filled

    _path: Path = PrivateAttr(default=Path("recipe.yaml"))
    _source: SourceMap = PrivateAttr(default_factory=lambda: SourceMap("recipe.yaml"))
    _moved: dict[str, KeyPath] = PrivateAttr(default_factory=dict)  # a stage's own keys

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
        if path and str(path[0]) in self._moved:
            path = (*self._moved[str(path[0])], *path[1:])
        return self._source.locate(path, prefer_key)

    def stage_views(self) -> list[tuple[str, Recipe]]:
        """(stage name, the recipe as that stage sees it); one unnamed stage when unstaged.

        A stage's view replaces the teacher, data, losses and train settings; errors in them
        are located where the stage wrote them."""
        if self.stages is None:
            return [("", self)]
        if isinstance(self.stages, ErnieTinyPreset):
            staged = self.stages.stages()
        else:
            staged = [
                (stage, {k: ("stages", i, k) for k in ("teacher", "data", "losses", "train")})
                for i, stage in enumerate(self.stages)
            ]
        views = []
        for stage, where in staged:
            update = {
                k: getattr(stage, k)
                for k in ("teacher", "data", "losses", "train")
                if getattr(stage, k) is not None
            }
            if stage.steps is not None:
                train = update.get("train", self.train)
                update["train"] = train.model_copy(update={"steps": stage.steps})
            view = self.model_copy(update=update)
            view._path, view._source = self._path, self._source
            view._moved = {k: v for k, v in where.items() if k in update}
            views.append((stage.name, view))
        return views


OVERRIDE_FILE = "<command line>"


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file. Raises RecipeError/RecipeErrors."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(Location(str(path)), "recipe file not found", "a path to a .yaml file")
    data, source = load_yaml(path.read_text(), str(path))
    if not isinstance(data, dict):
        raise RecipeError(source.locate(()), "a recipe must be a mapping of keys")
    for override in overrides:
        _apply_override(data, override, source)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeErrors([_to_recipe_error(e, source, Recipe) for e in exc.errors()]) from None
    recipe._path = path
    recipe._source = source
    return recipe


def validation_errors(
    exc: ValidationError, source: SourceMap, prefix: KeyPath, model: type[BaseModel]
) -> list[RecipeError]:
    """Pydantic errors of a sub-model validated at `prefix`, located in the recipe."""
    out = []
    for error in exc.errors():
        located = {**error, "loc": (*prefix, *error["loc"])}
        out.append(_to_recipe_error(located, source, model, len(prefix)))
    return out


def did_you_mean(word: str, choices: list[str] | set[str] | typing.KeysView[str]) -> str:
    """A suggestion for a misspelt name: close spelling, or one name containing the other."""
    options = list(choices)
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if not close:
        close = [c for c in options if len(c) >= 2 and (c in word or word in c)][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _to_recipe_error(
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


def _apply_override(data: dict[str, Any], override: str, source: SourceMap) -> None:
    """torchtune style `key.path=value`; list items by index (`losses.0.weight=0.5`)."""
    key, sep, raw = override.partition("=")
    where = Location(OVERRIDE_FILE, key_path=key)
    if not sep or not key:
        raise RecipeError(Location(OVERRIDE_FILE), f"override {override!r} is not key.path=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise RecipeError(where, f"override value {raw!r} is not valid YAML: {exc}") from None
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.split(".")]
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise RecipeError(where, f"{part!r} is not an index of the list at this key")
        elif isinstance(node, dict):
            if isinstance(part, int):
                part = str(part)
            if not last and part not in node:
                node[part] = {}
        else:
            raise RecipeError(where, f"cannot set {part!r} inside a {type(node).__name__}")
        if last:
            node[part] = value
        else:
            node = node[part]
    # Errors about an overridden value point at the command line, not at the file.
    source.overridden.add(tuple(parts))
