# mypy: disable-error-code="empty-body"
"""Every hook of compressor, grouped by pipeline phase.

Provider hooks (`compressor_*s`) take no arguments and return component classes. The
registry (`compressor.registry.Registry`) calls every implementation once, when it is
built, and checks each class it gets: a subclass of the hook's base class, with a `name`
no other plugin provides; anything else stops the program with a PluginError that names
the plugin and the hook. An implementation may return None (nothing provided).

Hooks that produce one thing are `firstresult`: the first non-None answer wins, so a
plugin marked `tryfirst=True` can take over from a built-in. No hook is `historic`: a
plugin registered after a hook was called does not get that call.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

# PROJECT and hookimpl stay importable from here, where plugins have always found them
from compressor.markers import PROJECT as PROJECT
from compressor.markers import hookimpl as hookimpl
from compressor.markers import hookspec

if TYPE_CHECKING:
    import torch
    from torch import fx

    from compressor.errors import Problem
    from compressor.evaluate import Evaluator
    from compressor.export import Exporter
    from compressor.graph_pass import GraphPass
    from compressor.loading import DataBundle, DataLoader, ModelLoader
    from compressor.losses import LossTerm
    from compressor.module_pass import ModulePass
    from compressor.optim import OptimizerFactory, ScheduleFactory
    from compressor.recipe import Recipe, StagePreset


# -- recipe ---------------------------------------------------------------------------------
@hookspec
def compressor_validate_recipe(recipe: Recipe) -> list[str | Problem] | None:
    """Return problems found in a parsed recipe: a `Problem` at a key path, or a sentence
    (reported at the top of the recipe). Any problem stops the run before anything loads.

    Every implementation is called, after the recipe's components are built and before the
    data and models load; the problems of all of them are reported together.

    :param recipe: The parsed, validated recipe; for a staged recipe, the recipe of the
        stage whose plan is being built (`Recipe.stage_views`). `recipe.locate(key_path)`
        says where a key was written.
    """


@hookspec
def compressor_stage_presets() -> list[type[StagePreset[Any]]]:
    """Return StagePreset classes (`compressor.recipe.StagePreset`): `stages: {preset: ...}`
    in a recipe names one, and its other keys are the preset's options."""


# -- load -----------------------------------------------------------------------------------
@hookspec
def compressor_model_loaders() -> list[type[ModelLoader[Any]]]:
    """Return ModelLoader classes (`compressor.loading.ModelLoader`): `loader:` in a
    recipe's `teacher:` / `student:` names one."""


@hookspec
def compressor_data_loaders() -> list[type[DataLoader[Any]]]:
    """Return DataLoader classes (`compressor.loading.DataLoader`): `data.loader` in a
    recipe names one."""


@hookspec
def compressor_validate_models(
    recipe: Recipe, teacher: torch.nn.Module | None, student: torch.nn.Module, data: DataBundle
) -> list[str | Problem] | None:
    """Return problems with the loaded models and data, before they are captured (e.g. the
    teacher and student tokenizers differ). Same forms as `compressor_validate_recipe`.

    Every implementation is called; the problems of all of them are reported together.

    :param recipe: The recipe (of the stage) being planned, as in
        `compressor_validate_recipe`.
    :param teacher: The teacher, loaded, module-passed, on the run's device, in eval form
        with gradients off; None when no loss reads the teacher.
    :param student: The student, loaded and module-passed (or the student an earlier stage
        left), on the run's device, in training form.
    :param data: The data the recipe's data loader returned: train and eval splits.
    """


# -- module passes (nn.Module -> nn.Module) ----------------------------------------------------
@hookspec
def compressor_module_passes() -> list[type[ModulePass[Any]]]:
    """Return ModulePass classes (`compressor.module_pass.ModulePass`): `module_passes:` in
    a recipe names them."""


# -- capture ----------------------------------------------------------------------------------
@hookspec(firstresult=True)
def compressor_capture(
    module: torch.nn.Module, example_inputs: tuple[Any, ...], role: str, method: str
) -> fx.GraphModule | None:
    """Capture `module` into a GraphModule whose nodes carry `nn_module_stack` metadata.

    `firstresult`: implementations are called in turn until one returns something other
    than None, and that GraphModule is the capture; the rest are not called. Return None to
    leave a module to the next implementation. The built-in (`plugins/capture.py`) is
    `trylast`: mark an implementation `tryfirst=True` to be asked before it.

    :param module: The model to capture, on the run's device: the teacher in eval form, the
        student once in training form and once in eval form (Dropout and BatchNorm modes
        are fixed at capture).
    :param example_inputs: The positional inputs of one forward call: the inputs of a
        training batch of a few samples, on the run's device.
    :param role: Which model this is: "teacher" or "student".
    :param method: The recipe's `capture.method`: "auto", "export" or "symbolic_trace".
    """


# -- graph passes (GraphModule -> PassResult) ---------------------------------------------------
@hookspec
def compressor_graph_passes() -> list[type[GraphPass[Any]]]:
    """Return GraphPass classes (`compressor.graph_pass.GraphPass`): `passes:` in a recipe
    names them."""


# -- losses -----------------------------------------------------------------------------------
@hookspec
def compressor_losses() -> list[type[LossTerm[Any]]]:
    """Return LossTerm classes (`compressor.losses.LossTerm`): `losses:` in a recipe names
    them."""


# -- evaluation -------------------------------------------------------------------------------
@hookspec
def compressor_evaluators() -> list[type[Evaluator[Any]]]:
    """Return Evaluator classes (`compressor.evaluate.Evaluator`), named by the data task
    they score (`classification`, `language-modeling`, `embedding`)."""


# -- engine -----------------------------------------------------------------------------------
@hookspec
def compressor_optimizers() -> list[type[OptimizerFactory[Any]]]:
    """Return OptimizerFactory classes (`compressor.optim.OptimizerFactory`):
    `train.optimizer` in a recipe names one."""


@hookspec
def compressor_schedules() -> list[type[ScheduleFactory[Any]]]:
    """Return ScheduleFactory classes (`compressor.optim.ScheduleFactory`):
    `train.schedule` in a recipe names one."""


@hookspec
def compressor_metrics_logged(record: dict[str, Any], run_dir: Path) -> None:
    """Observe every metrics record the engine appends to metrics.jsonl.

    Every implementation is called, on the leader rank only (rank 0 under torchrun), right
    after the record is written; what it returns is ignored.

    :param record: The record as written: `step`, then the losses, `grad_norm` and `lr` of
        a training step, or the `eval/...` scores of an evaluation. Do not change it.
    :param run_dir: The folder whose metrics.jsonl it is: the run folder, or the folder of
        a stage or of the baseline run inside it.
    """


# -- export -----------------------------------------------------------------------------------
@hookspec
def compressor_exporters() -> list[type[Exporter[Any]]]:
    """Return Exporter classes (`compressor.export.Exporter`): `export:` in a recipe names
    them."""


# -- report -----------------------------------------------------------------------------------
@hookspec
def compressor_write_report(report: dict[str, Any], run_dir: Path) -> list[Path] | None:
    """Write report files for a finished run; return the paths written.

    Every implementation is called, on the leader rank only, once the student is saved,
    exported and measured. An exception fails the run ("writing the report").

    :param report: The run's report: plain data (`compressor.report.build_report`), what
        the built-in writes as report.json.
    :param run_dir: The run folder, where the report files go.
    """
