"""Reading a recipe file: YAML with positions, command-line overrides (`key.path=value`), a
stage preset expanded by its plugin, a staged recipe's defaults from its first stage, then
the typed `Recipe`. Every error is located at file:line:column (or at the override)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from compressor.errors import Location, RecipeError, RecipeErrors
from compressor.recipe import PresetStage, Recipe, to_recipe_error
from compressor.registry import Registry
from compressor.yaml_positions import SourceMap, load_yaml

OVERRIDE_FILE = "<command line>"


def load_recipe(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    registry: Registry | None = None,
) -> Recipe:
    """Read, override and validate a recipe file. Raises RecipeError/RecipeErrors.

    `stages: {preset: NAME, ...}` is expanded by the stage-preset plugin of that name
    (from `registry`, by default every installed plugin) into a list of stages."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(Location(str(path)), "is a folder, not a recipe file", "a .yaml file")
    if not path.is_file():
        raise RecipeError(Location(str(path)), "recipe file not found", "a path to a .yaml file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            Location(str(path)),
            f"not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start})",
            "a YAML text file",
        ) from None
    data, source = load_yaml(text, str(path))
    if not isinstance(data, dict):
        raise RecipeError(source.locate(()), "a recipe must be a mapping of keys")
    for override in overrides:
        _apply_override(data, override, source)
    _expand_preset(data, source, registry)
    _defaults_from_first_stage(data, source)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeErrors([to_recipe_error(e, source, Recipe) for e in exc.errors()]) from None
    recipe._path = path
    recipe._source = source
    return recipe


def _expand_preset(data: dict[str, Any], source: SourceMap, registry: Registry | None) -> None:
    """`stages: {preset: NAME, ...options}` -> the list of stages the preset plugin makes."""
    stages = data.get("stages")
    if not isinstance(stages, dict):
        return
    if "preset" not in stages:
        raise RecipeError(
            source.locate(("stages",)),
            "stages: a mapping must name a preset",
            "a list of stages, or {preset: NAME, ...the preset's options}",
        )
    if registry is None:
        registry = Registry.load()
    options = {k: v for k, v in stages.items() if k != "preset"}
    name = str(stages["preset"])
    preset = registry.create(
        "stage_preset", name, options, source, ("stages",), ("stages", "preset")
    )
    expanded: list[PresetStage] = preset.expand()
    data["stages"] = [part.stage for part in expanded]
    for i, part in enumerate(expanded):
        for inside, written in part.written_at.items():
            source.aliases[("stages", i, *inside)] = ("stages", *written)


def _defaults_from_first_stage(data: dict[str, Any], source: SourceMap) -> None:
    """A staged recipe may leave out data, losses and train: the first stage's serve (train:
    default settings with the first stage's steps)."""
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages or not isinstance(stages[0], dict):
        return
    first = stages[0]
    if "train" not in first and first.get("steps") is not None:
        first = {**first, "train": {"steps": first["steps"]}}
    for key in ("data", "losses", "train"):
        if key not in data and first.get(key) is not None:
            data[key] = first[key]
            source.aliases[(key,)] = ("stages", 0, key if key in stages[0] else "steps")


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
