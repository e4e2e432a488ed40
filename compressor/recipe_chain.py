"""Teachers trained by other recipes: `teacher: {recipe: finetune.yaml}`.

A recipe may name another recipe (relative to its own folder) whose trained student is its
teacher, at the top level or in a stage, or whose student it continues. The CLI resolves the
chain once, before anything runs (`Chain`): every recipe named, and theirs, loaded once with
the run's registry, in the order they must run. `compress` runs those whose run has not
finished, top down, then the recipe asked for; a finished run made from another version of
its recipe (or with overrides) is refused rather than silently reused. `compress validate`
checks the whole chain without training: each recipe not yet run is validated, and the
recipe naming it with that recipe's student untrained (same architecture).

Which recipes a model comes from is the model loader's to say (`ModelLoader.recipes`); it
reaches the chain through `ModelLoader.chain` (`compressor.loading.RecipeModels`), which the
plan gives it. The built-in `recipe` loader (plugins/loaders.py) is one such loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from compressor.errors import RecipeError
from compressor.recipe import ModelSpec, Recipe
from compressor.recipe_file import load_recipe
from compressor.registry import Registry
from compressor.run_folder import recorded_overrides
from compressor.yaml_positions import KeyPath


@dataclass
class Link:
    """A recipe of the chain, and where the recipe that first named it did so: the model
    (`("teacher",)`) and the option naming the file. `also_at`: the models of the naming
    recipe that name it again (e.g. several stages' teachers)."""

    recipe: Recipe
    named_by: Recipe
    model_at: KeyPath
    named_at: KeyPath
    also_at: list[KeyPath] = field(default_factory=list)

    def finished(self) -> Path | None:
        return finished_run(self.recipe)


class Chain:
    """The recipes a run takes models from, and theirs: each loaded once, ordered so that a
    recipe comes after every recipe it names. A cycle or a missing file is a located error."""

    def __init__(self, top: Recipe, registry: Registry):
        self.top = top
        self.links: list[Link] = []
        self._add(top, registry, (top.path.resolve(),))

    def _add(self, recipe: Recipe, registry: Registry, trail: tuple[Path, ...]) -> None:
        for model_at, named_at, path in _named(recipe, registry, trail):
            known = [k for k in self.links if k.recipe.path.resolve() == path.resolve()]
            if known:  # named twice (e.g. by two stages): one link, run once
                if known[0].named_by is recipe:
                    known[0].also_at.append(model_at)
                continue
            source = load_recipe(path, registry=registry)
            self._add(source, registry, (*trail, path.resolve()))
            self.links.append(Link(source, recipe, model_at, named_at))

    def recipe(self, file: Path) -> Recipe | None:
        return next(
            (k.recipe for k in self.links if k.recipe.path.resolve() == file.resolve()), None
        )

    def pending(self) -> list[Link]:
        """The links whose run has not finished, in the order they must run."""
        return [link for link in self.links if link.finished() is None]


def teacher_recipes(recipe: Recipe, registry: Registry) -> list[tuple[KeyPath, KeyPath, Path]]:
    """(model, option naming the file, recipe file) of every model this recipe takes from
    another recipe (teachers, and a student that continues another recipe's student), as each
    model's loader says."""
    specs: list[tuple[KeyPath, ModelSpec | None]] = [
        (("teacher",), recipe.teacher),
        (("student",), recipe.student),
    ]
    specs += [(("stages", i, "teacher"), s.teacher) for i, s in enumerate(recipe.stages or [])]
    found = []
    for where, spec in specs:
        if spec is None or spec.from_teacher:
            continue
        # the loader's class says, from its validated options: no component is built here
        loader, options = registry.validated(
            "model_loader", spec.loader, spec.options, recipe.source, where, (*where, "loader")
        )
        found += [(where, at, path) for at, path in loader.recipes(options, recipe, where)]
    return found


def finished_run(source: Recipe) -> Path | None:
    """The run folder of `source` when its run finished (report and student written) from
    this very recipe; None when it has not run or not finished. A finished run of another
    version of the recipe is an error: reusing it would distil from a teacher nobody asked for."""
    run_dir = source.run_dir()
    if not ((run_dir / "report.json").is_file() and (run_dir / "student.safetensors").is_file()):
        return None
    copy = run_dir / "recipe.yaml"
    same = copy.is_file() and yaml.safe_load(copy.read_text()) == yaml.safe_load(
        source.path.read_text()
    )
    # an output= override naming this very folder changes nothing (earlier runners set one)
    overrides = [o for o in recorded_overrides(run_dir) if not o.startswith("output=")]
    if not same or overrides:
        raise RecipeError(
            source.locate(()),
            f"its run {run_dir} was made from another version of this recipe (or with "
            "command-line overrides), so it is not reused as a teacher",
            f"compress {source.path} --overwrite to train it again, or another output: folder",
        )
    return run_dir


def _named(
    recipe: Recipe, registry: Registry, trail: tuple[Path, ...]
) -> list[tuple[KeyPath, KeyPath, Path]]:
    found = teacher_recipes(recipe, registry)
    for _, named_at, path in found:
        if not path.is_file():
            raise RecipeError(recipe.locate(named_at), f"teacher recipe not found: {path}")
        if path.resolve() in trail:
            raise RecipeError(
                recipe.locate(named_at),
                f"{path} is already in this chain of teachers: a recipe cannot teach itself",
            )
    return found
