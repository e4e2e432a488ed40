# mypy: disable-error-code="empty-body"
"""Every hook of compressor, grouped by pipeline phase.

Provider hooks (`compressor_*s`) return component classes; all implementations are
collected, and the registry names the plugin behind each component. Hooks that produce
one thing are `firstresult`: the first non-None answer wins, so a plugin marked
`tryfirst=True` can take over from a built-in.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch
    from torch import fx

    from compressor.errors import Problem
    from compressor.loading import DataBundle
    from compressor.recipe import Recipe

PROJECT = "compressor"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- recipe ---------------------------------------------------------------------------------
@hookspec
def compressor_validate_recipe(recipe: Recipe) -> list[str | Problem] | None:
    """Return problems found in a parsed recipe: a `Problem` at a key path, or a sentence
    (reported at the top of the recipe). Any problem stops the run before anything loads."""


@hookspec
def compressor_stage_presets() -> list[type]:
    """Return StagePreset classes (`compressor.recipe.StagePreset`): `stages: {preset: ...}`."""


# -- load -----------------------------------------------------------------------------------
@hookspec
def compressor_model_loaders() -> list[type]:
    """Return ModelLoader classes (`compressor.loading.ModelLoader`)."""


@hookspec
def compressor_data_loaders() -> list[type]:
    """Return DataLoader classes (`compressor.loading.DataLoader`)."""


@hookspec
def compressor_validate_models(
    recipe: Recipe, teacher: torch.nn.Module | None, student: torch.nn.Module, data: DataBundle
) -> list[str | Problem] | None:
    """Return problems with the loaded models and data, before they are captured (e.g. the
    teacher and student tokenizers differ). Same forms as `compressor_validate_recipe`."""


# -- module passes (nn.Module -> nn.Module) ----------------------------------------------------
@hookspec
def compressor_module_passes() -> list[type]:
    """Return ModulePass classes (`compressor.module_pass.ModulePass`)."""


# -- capture ----------------------------------------------------------------------------------
@hookspec(firstresult=True)
def compressor_capture(
    module: torch.nn.Module, example_inputs: tuple[Any, ...], role: str, method: str
) -> fx.GraphModule | None:
    """Capture `module` into a GraphModule whose nodes carry `nn_module_stack` metadata."""


# -- graph passes (GraphModule -> PassResult) ---------------------------------------------------
@hookspec
def compressor_graph_passes() -> list[type]:
    """Return GraphPass classes (`compressor.graph_pass.GraphPass`)."""


# -- losses -----------------------------------------------------------------------------------
@hookspec
def compressor_losses() -> list[type]:
    """Return LossTerm classes (`compressor.losses.LossTerm`)."""


# -- evaluation -------------------------------------------------------------------------------
@hookspec
def compressor_evaluators() -> list[type]:
    """Return Evaluator classes (`compressor.evaluate.Evaluator`), named by the data task
    they score (`classification`, `language-modeling`, `embedding`)."""


# -- engine -----------------------------------------------------------------------------------
@hookspec
def compressor_optimizers() -> list[type]:
    """Return OptimizerFactory classes (`compressor.optim.OptimizerFactory`)."""


@hookspec
def compressor_schedules() -> list[type]:
    """Return ScheduleFactory classes (`compressor.optim.ScheduleFactory`)."""


@hookspec
def compressor_metrics_logged(record: dict[str, Any], run_dir: Path) -> None:
    """Observe every metrics record the engine appends to metrics.jsonl."""


# -- export -----------------------------------------------------------------------------------
@hookspec
def compressor_exporters() -> list[type]:
    """Return Exporter classes (`compressor.export.Exporter`)."""


# -- report -----------------------------------------------------------------------------------
@hookspec
def compressor_write_report(report: dict[str, Any], run_dir: Path) -> list[Path] | None:
    """Write report files for a finished run; return the paths written."""
