"""Everything a plugin author needs, in one import: `from compressor.api import ...`.

Component bases (one per kind a plugin can provide), the data they receive and return, the
helpers passes use to read and rewrite graphs, and the errors that reach users located.
docs/plugins.md shows each kind in use. compressor's own plugins (`plugins/`, `passes/`)
import the core through this module only (tests/test_layering.py), so it imports nothing
of the runner (plan, pipeline, engine, registry, plugin manager) and no plugin.
"""

# a module's graph as the plan captures it (for compressor.testing.check_pass); its output's name
from compressor.capture import OUTPUT_NAME_META, capture_module
from compressor.components import Component, NoOptions
from compressor.errors import ExportError, PluginError, Problem, RecipeError
from compressor.evaluate import EvalContext, Evaluator
from compressor.export import ExportContext, Exporter, ExportResult, Runner, export_check
from compressor.graph_pass import (
    BYPASS,
    INPUT_META,
    OUTPUT,
    PROVIDED,
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
    op_name,
    original_output,
    output_node,
    resolve_tap,
    set_outputs,
    tapped,
    token_grid,
)
from compressor.hookspecs import hookimpl
from compressor.loading import (
    IGNORE,
    Batch,
    DataBundle,
    DataLoader,
    Inputs,
    ModelLoader,
    RecipeModels,
    batch_size,
    call_model,
    call_with_kwargs,
    load_safetensors_weights,
    resolve_callable,
    to_device,
)
from compressor.losses import LossInputs, LossTerm, Shapes

# how `measure` times generation (tokens after a prompt of up to PROMPT_TOKENS), for reports
from compressor.measure import GENERATED_TOKENS, PROMPT_TOKENS
from compressor.module_pass import ModulePass, ModulePassContext
from compressor.optim import OptimizerFactory, ScheduleFactory
from compressor.recipe import DataSpec, LossSpec, ModelSpec, PresetStage, Recipe, StagePreset

# a key's path in a recipe, as `Recipe.locate` takes it: ("losses", 0, "student")
from compressor.yaml_positions import KeyPath

__all__ = [
    "BYPASS",
    "GENERATED_TOKENS",
    "IGNORE",
    "INPUT_META",
    "OUTPUT",
    "OUTPUT_NAME_META",
    "PROMPT_TOKENS",
    "PROVIDED",
    "SCAFFOLD_META",
    "Batch",
    "Component",
    "DataBundle",
    "DataLoader",
    "DataSpec",
    "EvalContext",
    "Evaluator",
    "ExportContext",
    "ExportError",
    "ExportResult",
    "Exporter",
    "GraphPass",
    "Inputs",
    "KeyPath",
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
    "PluginError",
    "PresetStage",
    "Problem",
    "Recipe",
    "RecipeError",
    "RecipeModels",
    "Runner",
    "ScheduleFactory",
    "Shapes",
    "StagePreset",
    "batch_size",
    "call_model",
    "call_with_kwargs",
    "capture_module",
    "eliminate_dead_code",
    "export_check",
    "format_shape",
    "hookimpl",
    "load_safetensors_weights",
    "module_paths",
    "node_module_path",
    "node_shape",
    "op_name",
    "original_output",
    "output_node",
    "resolve_callable",
    "resolve_tap",
    "set_outputs",
    "tapped",
    "to_device",
    "token_grid",
]
