"""A compressor plugin with one component of each kind a recipe names:

- model loader `conv_net`: a small CNN built from declared options;
- data loader `csv`: a CSV file of numeric features and a label column;
- graph pass `input_noise`: Gaussian noise on the student's input while training (noisy
  student), scaffolding that `strip` removes before export;
- loss `attention_transfer`: Zagoruyko and Komodakis' attention transfer between tapped
  feature maps of any widths;
- exporter `torchscript`: a TorchScript file, checked against PyTorch;

and a check on the loaded models that reports a located recipe error.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import fx, nn
from torch.utils.data import TensorDataset

from compressor.api import (
    BYPASS,
    SCAFFOLD_META,
    DataBundle,
    DataLoader,
    DataSpec,
    Exporter,
    ExportResult,
    GraphPass,
    Inputs,
    LossInputs,
    LossTerm,
    ModelLoader,
    NodeError,
    PassContext,
    PassResult,
    Problem,
    Recipe,
    RecipeError,
    Runner,
    Shapes,
    call_model,
    format_shape,
    hookimpl,
)


# -- a model loader with options ---------------------------------------------------------------
class ConvNetOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is a located recipe error
    channels: list[int] = Field(min_length=1, description="output channels per conv block")
    in_channels: int = Field(1, gt=0)
    classes: int = Field(10, gt=1)


class CNN(nn.Module):
    def __init__(self, in_channels: int, channels: list[int], classes: int):
        super().__init__()
        blocks: list[nn.Module] = []
        for c_in, c_out in zip([in_channels, *channels], channels, strict=False):
            blocks.append(
                nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            )
        self.features = nn.Sequential(*blocks)  # taps: features.0, features.1, ...
        self.head = nn.Linear(channels[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class ConvNet(ModelLoader[ConvNetOptions]):
    """A CNN of conv-ReLU-pool blocks (`features.i`) and a linear head (`head`)."""

    name = "conv_net"

    def load(self, recipe: Recipe, path: tuple[str | int, ...]) -> nn.Module:
        o = self.options
        return CNN(o.in_channels, o.channels, o.classes)


# -- a data loader -----------------------------------------------------------------------------
class CSVOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="a CSV file with a header row, relative to the recipe")
    label: str = Field("label", description="the column holding integer class labels")
    shape: list[int] | None = Field(None, description="reshape each row, e.g. [1, 8, 8]")
    eval_fraction: float = Field(0.2, gt=0, lt=1)


class CSVData(DataLoader[CSVOptions]):
    """Numeric features and integer labels from a CSV file (a fixed split: the last rows)."""

    name = "csv"

    def load(self, spec: DataSpec, recipe: Recipe) -> DataBundle:
        o = self.options
        file = recipe.resolve(o.path)
        where = recipe.locate(("data", "kwargs", "path"))
        if not file.is_file():
            raise RecipeError(where, f"CSV file not found: {file}", "a path relative to the recipe")
        with file.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or o.label not in rows[0]:
            raise RecipeError(where, f"{file} has no column {o.label!r}")
        features = [k for k in rows[0] if k != o.label]
        x = torch.tensor([[float(r[k]) for k in features] for r in rows])
        y = torch.tensor([int(r[o.label]) for r in rows])
        if o.shape is not None:
            x = x.reshape(len(rows), *o.shape)
        cut = len(rows) - max(1, round(len(rows) * o.eval_fraction))
        return DataBundle(
            TensorDataset(x[:cut], y[:cut]),
            TensorDataset(x[cut:], y[cut:]),
            task="classification",  # scored by the built-in classification evaluator
            num_classes=int(y.max()) + 1,
        )


# -- a graph pass ------------------------------------------------------------------------------
class NoiseOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sigma: float = Field(0.1, gt=0, description="standard deviation of the noise")


class InputNoise(GraphPass[NoiseOptions]):
    """Add Gaussian noise to the student's input in training (removed before export)."""

    name = "input_noise"
    runs_before = ("tap",)

    def __call__(self, gm: fx.GraphModule, context: PassContext) -> PassResult:
        if context.role != "student" or any(n.meta.get(SCAFFOLD_META) for n in gm.graph.nodes):
            return PassResult(gm, modified=False)  # honest, and a second run changes nothing
        x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        if len(x.users) == 0:
            raise NodeError("the first input is unused, so there is nothing to add noise to", x)
        with gm.graph.inserting_after(x):
            noise = gm.graph.call_function(torch.randn_like, (x,))
        with gm.graph.inserting_after(noise):
            scaled = gm.graph.call_function(torch.mul, (noise, self.options.sigma))
        with gm.graph.inserting_after(scaled):
            noisy = gm.graph.call_function(torch.add, (x, scaled))
        for user in list(x.users):
            if user not in (noise, noisy):
                user.replace_input_with(x, noisy)
        noise.meta[SCAFFOLD_META] = scaled.meta[SCAFFOLD_META] = True
        noisy.meta[SCAFFOLD_META] = BYPASS  # strip routes its users back to its first input
        gm.recompile()
        return PassResult(
            gm, modified=True, notes=[f"noise sigma {self.options.sigma} on {x.name}"]
        )


# -- a loss on taps ----------------------------------------------------------------------------
class ATOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student: str = Field(description="module path of a student feature map")
    teacher: str = Field(description="module path of a teacher feature map")


def attention_map(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Where a feature map [N, C, H, W] is active: mean squared activation over channels,
    resized to `size`, flattened and L2-normalised per sample -> [N, h*w]."""
    spatial = features.float().pow(2).mean(dim=1, keepdim=True)
    return F.normalize(F.adaptive_avg_pool2d(spatial, size).flatten(1), dim=1)


class AttentionTransfer(LossTerm[ATOptions]):
    """Attention transfer: distance of normalised spatial attention maps (any widths)."""

    name = "attention_transfer"

    def reads(self) -> dict[str, list[str]]:
        return {"student": [self.options.student], "teacher": [self.options.teacher]}

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        s, t = student_shapes[self.options.student], teacher_shapes[self.options.teacher]
        if s is None or t is None or len(s) != 4 or len(t) != 4:
            raise ValueError(
                f"loss 'attention_transfer' needs feature maps [N, C, H, W]; the student's is "
                f"{format_shape(s)} and the teacher's {format_shape(t)}"
            )
        self.size = (min(s[2], t[2]), min(s[3], t[3]))  # compare at the coarser grid

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        s = attention_map(inputs.student[self.options.student], self.size)
        t = attention_map(inputs.teacher[self.options.teacher], self.size)
        return (s - t).pow(2).sum(dim=1).mean()


# -- an exporter -------------------------------------------------------------------------------
class TorchScriptOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tolerance: float = Field(1e-5, gt=0, description="max abs difference allowed vs PyTorch")


class TorchScript(Exporter[TorchScriptOptions]):
    """A TorchScript file (torch.jit.trace of the stripped graph), checked against PyTorch."""

    name = "torchscript"

    def export(
        self,
        graph: fx.GraphModule,
        example_inputs: tuple[Inputs, ...],
        verify_inputs: list[tuple[Inputs, ...]],
        out_dir: Path,
        stem: str,
        module: nn.Module | None = None,
    ) -> ExportResult:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{stem}.pt"
        with torch.no_grad():
            torch.jit.trace(graph, example_inputs).save(str(path))
            loaded = torch.jit.load(str(path))
            diff = max(
                float((loaded(*inputs) - call_model(graph, inputs[0])).abs().max())
                for inputs in verify_inputs
            )
        return ExportResult(self.name, path, diff, self.options.tolerance)

    def runner(self, path: Path, providers: list[str] | None = None) -> Runner | None:
        loaded = torch.jit.load(str(path))  # TorchScript runs in PyTorch: no providers

        def run(inputs: tuple[Inputs, ...]) -> object:
            with torch.no_grad():
                return loaded(*inputs)

        return run


# -- a check on the loaded models and data -----------------------------------------------------
@hookimpl
def compressor_validate_models(
    recipe: Recipe, teacher: nn.Module | None, student: nn.Module, data: DataBundle
) -> list[Problem]:
    """A conv_net must take as many channels as the data has (caught before capture, and
    reported at the recipe key, instead of a shape error in the first convolution)."""
    channels = data.train[0][0].shape[0]
    problems = []
    for role, model in (("teacher", teacher), ("student", student)):
        if isinstance(model, CNN) and model.features[0][0].in_channels != channels:
            problems.append(
                Problem(
                    f"the {role} takes {model.features[0][0].in_channels} input channels and "
                    f"the data has {channels}",
                    (role, "in_channels"),
                    f"in_channels: {channels}",
                )
            )
    return problems


# -- registration: one hook per kind -----------------------------------------------------------
@hookimpl
def compressor_model_loaders() -> list[type]:
    return [ConvNet]


@hookimpl
def compressor_data_loaders() -> list[type]:
    return [CSVData]


@hookimpl
def compressor_graph_passes() -> list[type]:
    return [InputNoise]


@hookimpl
def compressor_losses() -> list[type]:
    return [AttentionTransfer]


@hookimpl
def compressor_exporters() -> list[type]:
    return [TorchScript]
