"""Teachers trained by other recipes: `teacher: {recipe: finetune.yaml}`.

A recipe may name another recipe (relative to its own folder) whose trained student is its
teacher, at the top level or in a stage. `compress` runs that recipe first when its run has
not finished, and reuses the finished run after; a run made from another version of that
recipe (or with overrides) is refused rather than silently reused. `compress validate`
checks the whole chain without training: each recipe not yet run is validated, and the
recipe naming it is validated with that recipe's student untrained (same architecture).

The `recipe` model loader (plugins/loaders.py) builds the named recipe's student, as that
recipe builds it (loader and module passes), and loads the run's `student.safetensors`.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from compressor.errors import RecipeError
from compressor.recipe import ModelSpec, Recipe, load_recipe
from compressor.registry import Registry
from compressor.yaml_positions import KeyPath

LOADER = "recipe"
# set while `compress validate` plans: a teacher recipe that has not run yet is then
# validated with its untrained student instead of being refused
_VALIDATING: contextvars.ContextVar[bool] = contextvars.ContextVar("validating", default=False)


def validating() -> bool:
    return _VALIDATING.get()


@contextlib.contextmanager
def validation() -> Iterator[None]:
    token = _VALIDATING.set(True)
    try:
        yield
    finally:
        _VALIDATING.reset(token)


def teacher_recipes(recipe: Recipe) -> list[tuple[KeyPath, Path]]:
    """(where, recipe file) of every model this recipe takes from another recipe: teachers,
    and a student that continues another recipe's student."""
    specs: list[tuple[KeyPath, ModelSpec | None]] = [
        (("teacher",), recipe.teacher),
        (("student",), recipe.student),
    ]
    specs += [(("stages", i, "teacher"), s.teacher) for i, s in enumerate(recipe.stages or [])]
    return [
        (where, recipe.resolve(str(spec.options["recipe"])))
        for where, spec in specs
        if spec is not None and spec.loader == LOADER and "recipe" in spec.options
    ]


def finished_run(source: Recipe) -> Path | None:
    """The run folder of `source` when its run finished (report and student written) from
    this very recipe; None when it has not run or not finished. A finished run of another
    version of the recipe is an error: reusing it would distil from a teacher nobody asked for."""
    run_dir = source.run_dir()
    if not ((run_dir / "report.json").is_file() and (run_dir / "student.safetensors").is_file()):
        return None
    from compressor.pipeline import recorded_overrides

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


def produce_teachers(
    recipe: Recipe, registry: Registry, progress: bool, chain: tuple[Path, ...] = ()
) -> None:
    """Run every teacher recipe of `recipe` (and theirs, first) whose run has not finished,
    once the whole chain, this recipe included, is valid: nothing trains for a recipe that
    would then fail."""
    sources = [
        (w, p, load_recipe(p, registry=registry)) for w, p in _checked(recipe, registry, chain)
    ]
    pending = [(w, p, source) for w, p, source in sources if finished_run(source) is None]
    if not pending:
        return
    if not chain:  # the first recipe checks the chain once, before anything trains
        from compressor.plan import plan_stages

        check_teachers(recipe, registry)
        with validation():
            plan_stages(recipe, registry)
    for where, path, source in pending:
        if finished_run(source) is not None:  # named twice (e.g. by two stages): run once
            continue
        produce_teachers(source, registry, progress, (*chain, recipe.path.resolve()))
        print(
            f"{recipe.locate(where)}: this model comes from {path}; training it first "
            f"(into {source.run_dir()})",
            file=sys.stderr,
        )
        from compressor.pipeline import run

        run(source, registry, progress=progress)


def check_teachers(recipe: Recipe, registry: Registry, chain: tuple[Path, ...] = ()) -> list[str]:
    """Validate every teacher recipe not yet run (and theirs); lines saying what was found."""
    from compressor.plan import plan_stages

    lines = []
    for where, path in _checked(recipe, registry, chain):
        source = load_recipe(path, registry=registry)
        run_dir = finished_run(source)
        if run_dir is not None:
            lines.append(f"{'.'.join(map(str, where))}: the finished run {run_dir}")
            continue
        lines += check_teachers(source, registry, (*chain, recipe.path.resolve()))
        with validation():
            plan_stages(source, registry)
        lines.append(
            f"{'.'.join(map(str, where))}: {path} has not run; it is valid, and `compress` "
            "trains it first (this recipe was checked with its student untrained)"
        )
    return lines


def _checked(
    recipe: Recipe, registry: Registry, chain: tuple[Path, ...]
) -> list[tuple[KeyPath, Path]]:
    found = teacher_recipes(recipe)
    for where, path in found:
        if not path.is_file():
            raise RecipeError(
                recipe.locate((*where, "recipe")), f"teacher recipe not found: {path}"
            )
        if path.resolve() in (*chain, recipe.path.resolve()):
            raise RecipeError(
                recipe.locate((*where, "recipe")),
                f"{path} is already in this chain of teachers: a recipe cannot teach itself",
            )
    return found
