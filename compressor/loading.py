"""Loading models and data: the component bases and the helpers loaders share."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import default_collate

from compressor.components import Component
from compressor.errors import RecipeError
from compressor.recipe import DataSpec, ModelSpec, Recipe, did_you_mean
from compressor.yaml_positions import KeyPath

# A model's inputs: one tensor (images, features), or named tensors for models whose forward
# takes several (Hugging Face: input_ids, attention_mask), passed as keyword arguments.
Inputs = torch.Tensor | dict[str, torch.Tensor]
Batch = tuple[Inputs, torch.Tensor]  # (inputs, target)


@dataclass
class DataBundle:
    """Map-style train and eval datasets whose items are (inputs, target) pairs."""

    train: Sequence[Any]
    eval: Sequence[Any]
    task: str = "classification"
    num_classes: int | None = None


def collate(dataset: Sequence[Any], indices: Iterable[Any], device: torch.device) -> Batch:
    inputs, target = default_collate([dataset[int(i)] for i in indices])
    if isinstance(inputs, dict):
        inputs, target = _trim_padding(inputs, target)
    return to_device(inputs, device), target.to(device)


def _trim_padding(
    inputs: dict[str, torch.Tensor], target: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Texts are stored padded to a fixed length; a batch keeps only up to its longest text
    (columns where every attention_mask entry is 0 change nothing but cost time)."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return inputs, target
    used = mask.any(0).nonzero()
    length = max(2, int(used.max()) + 1) if len(used) else 2  # 1 would specialise in export
    inputs = {k: v[:, :length] if v.dim() == 2 else v for k, v in inputs.items()}
    if target.dim() == 2:  # per-token labels
        target = target[:, :length]
    return inputs, target


def to_device(inputs: Inputs, device: torch.device) -> Inputs:
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


def batch_size(inputs: Inputs) -> int:
    return len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)


def head(inputs: Inputs, n: int) -> Inputs:
    """The first `n` samples."""
    return {k: v[:n] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[:n]


def call_model(model: Any, inputs: Inputs, **extra: torch.Tensor) -> Any:
    """Run a model or graph on one batch; named inputs go in as keyword arguments."""
    if isinstance(inputs, dict):
        return model(**inputs, **extra)
    return model(inputs, **extra)


class ModelLoader(Component):
    kind: ClassVar[str] = "model_loader"

    def load(self, spec: ModelSpec, recipe: Recipe, path: KeyPath) -> nn.Module:
        raise NotImplementedError


class DataLoader(Component):
    kind: ClassVar[str] = "data_loader"

    def load(self, spec: DataSpec, recipe: Recipe) -> DataBundle:
        raise NotImplementedError


def resolve_callable(target: str, recipe: Recipe, path: KeyPath) -> Callable[..., Any]:
    """`package.module:function`, or `path/to/file.py:function` relative to the recipe."""
    where = recipe.locate(path)
    module_part, sep, attr = target.rpartition(":")
    if not sep or not module_part or not attr:
        raise RecipeError(
            where, f"{target!r} does not name a callable", "module:function or file.py:function"
        )
    if module_part.endswith(".py"):
        file = recipe.resolve(module_part)
        if not file.is_file():
            raise RecipeError(where, f"file not found: {file}")
        module = import_file(file)
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as exc:
            raise RecipeError(where, f"cannot import {module_part!r}: {exc}") from None
    function = getattr(module, attr, None)
    if not callable(function):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise RecipeError(
            where,
            f"{module_part} has no callable {attr!r}{did_you_mean(attr, names)}",
            ", ".join(sorted(names)),
        )
    return function


def call_with_kwargs(
    function: Callable[..., Any], kwargs: dict[str, Any], recipe: Recipe, path: KeyPath
) -> Any:
    """Call with recipe kwargs; a wrong keyword is a recipe error naming the signature."""
    signature = inspect.signature(function)
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise RecipeError(recipe.locate(path), f"{function.__name__}{signature}: {exc}") from None
    return function(**kwargs)


def import_file(file: Path) -> Any:
    name = f"compressor_user_{abs(hash(str(file.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_safetensors_weights(model: nn.Module, file: Path, recipe: Recipe, path: KeyPath) -> None:
    """Load weights from safetensors only: a pickle can execute code, a safetensors file cannot."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = recipe.locate(path)
    if file.suffix != ".safetensors":
        raise RecipeError(
            where, f"{file} is not a .safetensors file", "weights in safetensors format"
        )
    if not file.is_file():
        raise RecipeError(where, f"weights file not found: {file}")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise RecipeError(where, f"cannot read {file}: {exc}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if wrong:
            parts.append(f"shape mismatch {wrong[:5]}")
        raise RecipeError(where, f"{file} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state)
