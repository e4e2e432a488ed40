"""Everything a plugin author needs, in one import: `from compressor.api import ...`.

Component bases (one per kind a plugin can provide), the data they receive and return, the
helpers passes use to read and rewrite graphs, and the errors that reach users located.
docs/plugins.md shows each kind in use.
"""

from compressor.components import Component, NoOptions
from compressor.errors import Problem, RecipeError
from compressor.evaluate import EvalContext, Evaluator
from compressor.export import ExportContext, Exporter, ExportResult, Runner
from compressor.graph_pass import (
    BYPASS,
    INPUT_META,
    OUTPUT,
    SCAFFOLD_META,
    GraphPass,
    NodeError,
    PassContext,
    PassResult,
    eliminate_dead_code,
    format_shape,
    module_paths,
    node_module_path,
    node_shape,
    original_output,
    output_node,
    resolve_tap,
    set_outputs,
    tapped,
)
from compressor.hookspecs import hookimpl
from compressor.loading import (
    IGNORE,
    Batch,
    DataBundle,
    DataLoader,
    Inputs,
    ModelLoader,
    call_model,
    call_with_kwargs,
    load_safetensors_weights,
    resolve_callable,
)
from compressor.losses import LossInputs, LossTerm, Shapes
from compressor.module_pass import ModulePass, ModulePassContext
from compressor.optim import OptimizerFactory, ScheduleFactory
from compressor.recipe import DataSpec, LossSpec, ModelSpec, PresetStage, Recipe, StagePreset

__all__ = [
    "BYPASS",
    "IGNORE",
    "INPUT_META",
    "OUTPUT",
    "SCAFFOLD_META",
    "Batch",
    "Component",
    "DataBundle",
    "DataLoader",
    "DataSpec",
    "EvalContext",
    "Evaluator",
    "ExportContext",
    "ExportResult",
    "Exporter",
    "GraphPass",
    "Inputs",
    "LossInputs",
    "LossSpec",
    "LossTerm",
    "ModelLoader",
    "ModelSpec",
    "ModulePass",
    "ModulePassContext",
    "NoOptions",
    "NodeError",
    "OptimizerFactory",
    "PassContext",
    "PassResult",
    "PresetStage",
    "Problem",
    "Recipe",
    "RecipeError",
    "Runner",
    "ScheduleFactory",
    "Shapes",
    "StagePreset",
    "call_model",
    "call_with_kwargs",
    "eliminate_dead_code",
    "format_shape",
    "hookimpl",
    "load_safetensors_weights",
    "module_paths",
    "node_module_path",
    "node_shape",
    "original_output",
    "output_node",
    "resolve_callable",
    "resolve_tap",
    "set_outputs",
    "tapped",
]
