"""Built-in loaders: models from Python callables (+ safetensors weights), data from a
callable or from scikit-learn's bundled digits images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import TensorDataset

from compressor.api import (
    DataBundle,
    DataLoader,
    DataSpec,
    KeyPath,
    ModelLoader,
    PluginError,
    Recipe,
    RecipeError,
    call_with_kwargs,
    hookimpl,
    load_safetensors_weights,
    resolve_callable,
)


class CallableModelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="module:function or file.py:function (relative to the recipe)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to the function")
    weights: str | None = Field(None, description="a .safetensors file (never a pickle)")


class CallableModel(ModelLoader[CallableModelOptions]):
    """A model built by a Python callable (`module:function` or `file.py:function`)."""

    name = "callable"

    def load(self, recipe: Recipe, path: KeyPath) -> nn.Module:
        o = self.options
        build = resolve_callable(o.model, recipe, (*path, "model"))
        model = call_with_kwargs(build, o.kwargs, recipe, (*path, "kwargs"))
        if not isinstance(model, nn.Module):
            raise RecipeError(
                recipe.locate((*path, "model")),
                f"{o.model} returned {type(model).__name__}, not a torch.nn.Module",
            )
        if o.weights:
            load_safetensors_weights(model, recipe.resolve(o.weights), recipe, (*path, "weights"))
        return model


class RecipeModelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recipe: str = Field(description="another recipe (relative to this one) whose student this is")


class RecipeModel(ModelLoader[RecipeModelOptions]):
    """The student another recipe trained: built as that recipe builds it, with its run's
    student.safetensors (`compress` trains it first when it has not run)."""

    name = "recipe"

    @classmethod
    def recipes(
        cls, options: BaseModel, recipe: Recipe, path: KeyPath
    ) -> list[tuple[KeyPath, Path]]:
        assert isinstance(options, RecipeModelOptions)  # the registry validated them so
        return [((*path, "recipe"), recipe.resolve(options.recipe))]

    def load(self, recipe: Recipe, path: KeyPath) -> nn.Module:
        file = recipe.resolve(self.options.recipe)
        chain = self.chain
        if chain is None:
            raise PluginError(f"the recipe loader at {recipe.locate(path)} was not given its chain")
        run_dir = chain.finished_run(file)
        if run_dir is None and not chain.untrained_ok:
            raise RecipeError(
                recipe.locate((*path, "recipe")),
                f"this model is the student of {file}, whose run has not finished",
                f"compress {recipe.path} (it trains {file.name} first), or compress {file}",
            )
        student = chain.student(file)
        if run_dir is not None:
            weights = run_dir / "student.safetensors"
            load_safetensors_weights(student, weights, recipe, (*path, "recipe"))
        return student


class CallableDataOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    function: str = Field(description="module:function or file.py:function returning a DataBundle")
    kwargs: dict[str, Any] = {}


class CallableData(DataLoader[CallableDataOptions]):
    """Data from a Python callable that returns a `compressor.loading.DataBundle`."""

    name = "callable"

    def load(self, spec: DataSpec, recipe: Recipe) -> DataBundle:
        path: KeyPath = ("data", "kwargs")
        make = resolve_callable(self.options.function, recipe, (*path, "function"))
        bundle = call_with_kwargs(make, self.options.kwargs, recipe, (*path, "kwargs"))
        if not isinstance(bundle, DataBundle):
            raise RecipeError(
                recipe.locate((*path, "function")),
                f"{self.options.function} returned {type(bundle).__name__}, not a DataBundle",
            )
        return bundle


class DigitsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    eval_fraction: float = Field(0.25, gt=0, lt=1)
    split_seed: int = 0
    train_limit: int | None = Field(None, gt=0, description="use only this many training images")
    flatten: bool = Field(False, description="64-vectors instead of 1x8x8 images")


class Digits(DataLoader[DigitsOptions]):
    """scikit-learn's 1797 8x8 handwritten digits, stratified fixed train/eval split."""

    name = "digits"

    def load(self, spec: DataSpec, recipe: Recipe) -> DataBundle:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        o = self.options
        images, labels = load_digits(return_X_y=True)
        x_train, x_eval, y_train, y_eval = train_test_split(
            images, labels, test_size=o.eval_fraction, random_state=o.split_seed, stratify=labels
        )
        if o.train_limit is not None:
            x_train, y_train = x_train[: o.train_limit], y_train[: o.train_limit]
        shape = (-1, 64) if o.flatten else (-1, 1, 8, 8)

        def dataset(x: Any, y: Any) -> Any:  # a TensorDataset: indexable, sized
            # pixel values are 0..16
            inputs = torch.tensor(x, dtype=torch.float32).reshape(shape) / 16.0
            return TensorDataset(inputs, torch.tensor(y, dtype=torch.long))

        return DataBundle(dataset(x_train, y_train), dataset(x_eval, y_eval), "classification", 10)


@hookimpl
def compressor_model_loaders() -> list[type]:
    return [CallableModel, RecipeModel]


@hookimpl
def compressor_data_loaders() -> list[type]:
    return [CallableData, Digits]
