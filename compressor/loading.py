"""Loading models and data: the component bases and the helpers loaders share."""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import sys
import sysconfig
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.data import TensorDataset, default_collate

from compressor.components import Component, OptionsT
from compressor.errors import RecipeError, first_line
from compressor.recipe import DataSpec, Recipe, did_you_mean
from compressor.yaml_positions import KeyPath

# A model's inputs: one tensor (images, features), or named tensors for models whose forward
# takes several (Hugging Face: input_ids, attention_mask), passed as keyword arguments.
Inputs = torch.Tensor | dict[str, torch.Tensor]
Batch = tuple[Inputs, torch.Tensor]  # (inputs, target)
# The label of a target element that is not scored (padding, prompts), as in torch's losses.
IGNORE = -100


@dataclass
class DataBundle:
    """What a data loader returns: map-style train and eval datasets whose items are
    (inputs, target) pairs, the task that names the evaluator scoring them
    (`classification`, `language-modeling`, `embedding`, or a plugin's own), and how a list
    of items becomes a batch (`collate_fn`; a loader may trim padding there).

    `target_map` renumbers the labels of every batch for a student that predicts a subset of
    the classes (a pruned vocabulary): label -> the student's class, IGNORE where it has none;
    the teacher's outputs are then read over the same subset."""

    train: Sequence[Any]
    eval: Sequence[Any]
    task: str = "classification"
    num_classes: int | None = None
    collate_fn: Callable[[list[Any]], Batch] = default_collate
    target_map: torch.Tensor | None = None
    _lengths: torch.Tensor | None = field(default=None, init=False, repr=False)

    def batch(self, split: str, indices: Iterable[Any], device: torch.device) -> Batch:
        """The items at `indices` of `split` ("train" or "eval") as one batch on `device`."""
        dataset = self.train if split == "train" else self.eval
        inputs: Inputs
        if isinstance(dataset, TensorDataset) and self.collate_fn is default_collate:
            # what default_collate would build, by indexing the stored tensors at once
            index = torch.as_tensor(indices if isinstance(indices, torch.Tensor) else list(indices))
            inputs, target = (t[index] for t in dataset.tensors)
        else:
            inputs, target = self.collate_fn([dataset[int(i)] for i in indices])
        if self.target_map is not None:
            scored = target != IGNORE
            target = torch.where(scored, self.target_map[target.clamp(min=0)], IGNORE)
        return to_device(inputs, device), target.to(device)

    def sizes(self) -> dict[str, int]:
        """Samples per split, and for text (items with an attention mask) the tokens the
        training split holds, padding not counted."""
        out = {"train_samples": len(self.train), "eval_samples": len(self.eval)}
        lengths = self.lengths()
        if lengths is not None:
            out["train_tokens"] = int(lengths.sum())
        return out

    def lengths(self) -> torch.Tensor | None:
        """Real tokens (the attention mask's sum) of every training item, computed once; None
        when the items have no attention mask."""
        first = self.train[0][0] if len(self.train) else None
        if not isinstance(first, dict) or "attention_mask" not in first:
            return None
        if self._lengths is None:
            self._lengths = torch.tensor([int(x["attention_mask"].sum()) for x, _ in self.train])
        return self._lengths


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


class RecipeModels(Protocol):
    """The recipes a run takes models from (its chain, resolved once before anything runs),
    as a model loader sees them: `ModelLoader.chain`."""

    untrained_ok: bool  # validate/graph: a recipe not yet run gives its untrained student

    def finished_run(self, file: Path) -> Path | None:
        """The folder of the recipe's finished run; None while it has not run."""

    def student(self, file: Path) -> nn.Module:
        """The recipe's student, untrained, built as that recipe builds it (its loader and
        module passes, the run's registry)."""


class ModelLoader(Component[OptionsT]):
    """Builds a model from its options: the keys beside `loader:` in `teacher:`/`student:`.
    `path` is where those keys sit in the recipe (`("teacher",)`), for located errors.

    A loader whose model another recipe trains names that recipe in the class method
    `recipes` (the CLI runs it first) and reaches its run through `chain`, which the plan sets
    before `load`."""

    chain: RecipeModels | None = None

    def load(self, recipe: Recipe, path: KeyPath) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def recipes(
        cls, options: BaseModel, recipe: Recipe, path: KeyPath
    ) -> list[tuple[KeyPath, Path]]:
        """(where the recipe names it, file) of each recipe whose run the model these
        (validated) options describe comes from. Asked before any component is built."""
        return []


class DataLoader(Component[OptionsT]):
    """Builds the train and eval data from its options (`data.kwargs`); `spec` is the
    whole `data:` section (batch sizes)."""

    def load(self, spec: DataSpec, recipe: Recipe) -> DataBundle:
        raise NotImplementedError


def resolve_callable(target: str, recipe: Recipe, path: KeyPath) -> Callable[..., Any]:
    """`package.module:function`, or `path/to/file.py:function` relative to the recipe.

    While the module is imported, the recipe's folder is on the import path, so a model file
    can import its neighbours; whatever the import raises is a recipe error at `path` that
    names the user's file and line."""
    where = recipe.locate(path)
    module_part, sep, attr = target.rpartition(":")
    if not sep or not module_part or not attr:
        raise RecipeError(
            where, f"{target!r} does not name a callable", "module:function or file.py:function"
        )
    folder = recipe.path.parent
    try:
        if module_part.endswith(".py"):
            file = recipe.resolve(module_part)
            if not file.is_file():
                raise RecipeError(where, f"file not found: {file}")
            module = import_file(file)
        else:
            with _on_import_path(folder):
                module = importlib.import_module(module_part)
    except RecipeError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name and module_part.startswith(exc.name):
            raise RecipeError(where, f"cannot import {module_part!r}: {exc}") from None
        raise user_code_error(where, f"importing {module_part}", exc, folder) from None
    except Exception as exc:
        raise user_code_error(where, f"importing {module_part}", exc, folder) from None
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
    """Call with recipe kwargs; a wrong keyword is a recipe error naming the signature, and
    an exception from the function is a recipe error naming the user's file and line."""
    signature = inspect.signature(function)
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise RecipeError(recipe.locate(path), f"{function.__name__}{signature}: {exc}") from None
    try:
        return function(**kwargs)
    except Exception as exc:
        called = f"{function.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
        raise user_code_error(
            recipe.locate(path), f"calling {called}", exc, recipe.path.parent
        ) from None


def user_code_error(where: Any, doing: str, exc: BaseException, folder: Path) -> RecipeError:
    """A recipe error for an exception raised by the user's code: what was being done, the
    user's file:line (the innermost frame in the recipe's folder, else outside libraries),
    then the exception."""
    frame = user_frame(exc, folder)
    at = f"\n  at {frame}" if frame else ""
    return RecipeError(where, f"{doing} raised {first_line(exc)}{at}")


def user_frame(exc: BaseException, folder: Path | None = None) -> str | None:
    """`file:line in function: source` of the innermost traceback frame that is the user's:
    inside `folder` if any is, else outside Python's, the installed packages' and
    compressor's own files."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]

    def under(frame: traceback.FrameSummary, root: Path) -> bool:
        return Path(frame.filename).resolve().is_relative_to(root)

    chosen = [f for f in frames if folder is not None and under(f, folder.resolve())]
    if not chosen:
        chosen = [f for f in frames if not any(under(f, lib) for lib in _library_folders())]
    if not chosen:
        return None
    frame = chosen[-1]
    line = (frame.line or "").strip()
    return f"{frame.filename}:{frame.lineno} in {frame.name}" + (f": {line}" if line else "")


@functools.cache
def _library_folders() -> tuple[Path, ...]:
    # the built-ins' folders, found without importing them: the core imports no plugin
    specs = [
        importlib.util.find_spec(f"compressor.{name}") for name in ("cuda", "passes", "plugins")
    ]
    ours = [Path(p) for spec in specs if spec for p in spec.submodule_search_locations or ()]
    stdlib = [sysconfig.get_path(name) for name in ("stdlib", "platstdlib", "purelib", "platlib")]
    return tuple({p.resolve() for p in [*ours, Path(__file__).parent, *map(Path, stdlib)]})


@contextlib.contextmanager
def _on_import_path(folder: Path) -> Iterator[None]:
    entry = str(folder.resolve())
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def import_file(file: Path) -> Any:
    """Import a Python file as a module of its own, with its folder on the import path while
    it runs (so it can import its neighbours). A failed import leaves nothing behind."""
    name = f"compressor_user_{abs(hash(str(file.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with _on_import_path(file.parent):
            spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
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
