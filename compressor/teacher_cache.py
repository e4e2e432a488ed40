"""The teacher's outputs, computed once per training sample and read back in later epochs.

The teacher is frozen in eval form and the training data are fixed, so what the losses read
from it on a sample never changes. The first time a sample is in a batch the teacher runs
and its outputs are kept, per sample, on the CPU; a later batch made only of kept samples
runs no teacher. With `top_k`, a loss that reads the teacher's logits may keep them as
sparse targets instead (`LossTerm.cached_teacher`; `kd` keeps the k most likely tokens and
the mass of the rest, `compressor.cuda.sparse`), from the first epoch on, so every epoch
optimises the same loss.

Samples are saved to the run folder at each checkpoint (`teacher_cache/part-<step>.safetensors`,
each written whole and renamed into place), so a resumed run reads them instead of running
the teacher again.

Text batches are trimmed to their longest row, so a sample's outputs have the token length
of the batch they were computed in; they are cut or zero-padded to the length of the batch
they are read in (positions past a sample's own end are padding, which losses mask).
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import fx, nn

from compressor.errors import RecipeError
from compressor.graph_pass import (
    OUTPUT,
    node_shape,
    original_output,
    tap_shapes,
    tapped,
)
from compressor.loading import Inputs
from compressor.losses import BoundLoss, LossTerm
from compressor.recipe import Recipe
from compressor.world import launched


@dataclass
class CacheLayout:
    """What the plan decided the cache keeps: `sequence_dims` per teacher value (the dims,
    counting the batch dim, that follow the token count), `compress` turning the teacher's
    values into what is kept (the losses' `cached_teacher`, in order), and the budget."""

    sequence_dims: dict[str, tuple[int, ...]]
    compress: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = lambda v: v
    memory_bytes: int = 4096 * 2**20
    # teacher values that are parameters (a fused head's weight): the same for every sample
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    # what the kept values depend on (recipe parts); a saved cache made otherwise is dropped
    fingerprint: str = ""


@dataclass
class CacheStats:
    cached_samples: int = 0
    cached_bytes: int = 0
    full: bool = False  # the memory budget stopped caching
    live_steps: int = 0
    cached_steps: int = 0
    live_seconds: float = 0.0
    cached_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def record(self, from_cache: bool, seconds: float) -> None:
        """A training step's time, by whether its teacher values came from the cache."""
        if from_cache:
            self.cached_steps, self.cached_seconds = (
                self.cached_steps + 1,
                self.cached_seconds + seconds,
            )
        else:
            self.live_steps, self.live_seconds = self.live_steps + 1, self.live_seconds + seconds

    def summary(self) -> dict[str, Any]:
        def rate(steps: int, seconds: float) -> float | None:
            return steps / seconds if seconds > 0 else None

        live, cached = (
            rate(self.live_steps, self.live_seconds),
            rate(self.cached_steps, self.cached_seconds),
        )
        return {
            "cached_samples": self.cached_samples,
            "cached_mb": self.cached_bytes / 2**20,
            "budget_reached": self.full,
            "steps_with_teacher": self.live_steps,
            "steps_from_cache": self.cached_steps,
            "steps_per_s_with_teacher": live,
            "steps_per_s_from_cache": cached,
            "speedup": cached / live if live and cached else None,
            "notes": self.notes,
        }


class TeacherCache:
    def __init__(self, layout: CacheLayout, folder: Path | None = None):
        self.layout = layout
        self.folder = folder
        self.samples: dict[int, dict[str, torch.Tensor]] = {}
        self.tokens: dict[int, int] = {}  # token length of the batch each sample was kept from
        self.unsaved: set[int] = set()
        self.stats = CacheStats()
        self.last_hit = False  # whether the last lookup found the whole batch

    # -- reading ----------------------------------------------------------------------------
    def lookup(
        self, indices: Sequence[int], x: Inputs, device: torch.device
    ) -> dict[str, torch.Tensor] | None:
        """The teacher's values for this batch when every sample is kept, else None
        (`last_hit` says which, for the step's timing)."""
        keys = [int(i) for i in indices]
        self.last_hit = bool(keys) and all(k in self.samples for k in keys)
        if not self.last_hit:
            return None
        tokens = _tokens(x)
        out: dict[str, torch.Tensor] = dict(self.layout.constants)
        for name in self.samples[keys[0]]:
            rows = [_fit(self.samples[k][name], self._dims(name, k), tokens) for k in keys]
            out[name] = torch.stack(rows).to(device, non_blocking=True)
        return out

    def _dims(self, name: str, index: int) -> tuple[int, ...]:
        """The dims of `name` that follow the token count: as captured, or where the capture
        kept no symbolic shapes (symbolic_trace), the dims of the length the sample was kept at."""
        dims = self.layout.sequence_dims.get(name)
        if dims is not None:
            return dims
        kept_at = self.tokens.get(index)
        shape = self.samples[index][name].shape
        return tuple(d + 1 for d, size in enumerate(shape) if kept_at and size == kept_at)

    # -- writing ----------------------------------------------------------------------------
    def store(
        self, indices: Sequence[int], x: Inputs, teacher: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Keep this batch's values per sample; returns what the losses read (for `top_k`,
        sparse targets in place of the logits)."""
        values = self.layout.compress(teacher)
        per_sample = {  # a truncated teacher's output is None: nothing to keep
            k: v
            for k, v in values.items()
            if v is not None and not isinstance(v, nn.Parameter) and k not in self.layout.constants
        }
        tokens = _tokens(x)
        for row, index in enumerate(int(i) for i in indices):
            if index in self.samples or self.stats.full:
                continue
            sample = {k: v[row].detach().to("cpu", copy=True) for k, v in per_sample.items()}
            size = sum(t.numel() * t.element_size() for t in sample.values())
            if self.stats.cached_bytes + size > self.layout.memory_bytes:
                self.stats.full = True
                self.stats.notes.append(
                    f"the teacher cache reached its budget ({self.layout.memory_bytes / 2**20:.0f} "
                    f"MB) at {len(self.samples)} samples; the rest run the teacher every time"
                )
                continue
            self.samples[index] = sample
            if tokens is not None:
                self.tokens[index] = tokens
            self.unsaved.add(index)
            self.stats.cached_samples += 1
            self.stats.cached_bytes += size
        return values

    # -- the run folder ---------------------------------------------------------------------
    def save(self, step: int) -> None:
        """Write the samples kept since the last save, as one part, atomically."""
        if self.folder is None or not self.unsaved:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{index}/{name}": value.contiguous()
            for index in sorted(self.unsaved)
            for name, value in self.samples[index].items()
        }
        tokens = {str(i): str(self.tokens[i]) for i in sorted(self.unsaved) if i in self.tokens}
        metadata = {"fingerprint": self.layout.fingerprint, "tokens": json.dumps(tokens)}
        path = self.folder / f"part-{step:08d}.safetensors"
        partial = path.with_suffix(".partial")
        save_file(tensors, str(partial), metadata=metadata)
        os.replace(partial, path)
        self.unsaved.clear()

    def load(self, up_to_step: int) -> None:
        """Read the parts saved up to `up_to_step` (a resumed run's checkpoint); later parts
        belong to steps that will run again and are dropped."""
        if self.folder is None or not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("part-*.safetensors")):
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
            if int(path.stem.removeprefix("part-")) > up_to_step:
                path.unlink()
                continue
            if metadata.get("fingerprint") != self.layout.fingerprint:
                self.stats.notes.append(
                    f"{path.name} was kept for another teacher, data or loss settings: dropped"
                )
                path.unlink()
                continue
            for key, value in load_file(str(path)).items():
                index, _, name = key.partition("/")
                sample = self.samples.setdefault(int(index), {})
                sample[name] = value
            for index, tokens in json.loads(metadata.get("tokens", "{}")).items():
                self.tokens[int(index)] = int(tokens)
        self.stats.cached_samples = len(self.samples)
        self.stats.cached_bytes = sum(
            t.numel() * t.element_size() for s in self.samples.values() for t in s.values()
        )

    def clear_folder(self) -> None:
        """A fresh run does not trust another run's cache."""
        if self.folder is not None and self.folder.is_dir():
            for path in self.folder.glob("part-*"):
                path.unlink()


# -- the layout a recipe asks for ----------------------------------------------------------
def cache_layout(
    recipe: Recipe,
    teacher_graph: fx.GraphModule | None,
    losses: list[BoundLoss],
    input_specs: dict[str, dict[str, Any]],
) -> CacheLayout | None:
    """What `teacher_cache` keeps of the tapped, truncated `teacher_graph` for `losses`, or
    None without one; a cache that cannot hold is a located recipe error."""
    spec = recipe.teacher_cache
    if spec is None:
        return None
    where = recipe.locate(("teacher_cache",), prefer_key=True)
    if launched():
        raise RecipeError(
            where,
            "teacher_cache keeps one process's cache and is not available under torchrun",
            "remove teacher_cache, or run in one process",
        )
    if teacher_graph is None:
        if recipe.stages is not None:  # a stage without a teacher has nothing to cache
            return None
        raise RecipeError(where, "teacher_cache is set, but no loss reads the teacher")
    if input_specs:
        raise RecipeError(
            where,
            "the teacher's outputs depend on inputs drawn anew at every step "
            f"({', '.join(input_specs)}), so they cannot be cached",
            "teacher_cache only with graphs that add no random inputs (no mae_mask)",
        )
    if spec.top_k is not None:
        _check_sparse_readers(recipe, losses)
    taps = tapped(teacher_graph)
    shapes = tap_shapes(teacher_graph, list(taps))
    node = original_output(teacher_graph)
    shapes[OUTPUT] = node_shape(node) if isinstance(node, fx.Node) else None
    constants = {  # taps of parameters (a fused head's weight): kept once, not per sample
        name: operator.attrgetter(str(tap.target))(teacher_graph)
        for name, tap in taps.items()
        if tap.op == "get_attr"
    }
    sequence_dims = {
        name: tuple(d for d, size in enumerate(shape) if d > 0 and not isinstance(size, int))
        for name, shape in shapes.items()
        if shape is not None
    }
    top_k = spec.top_k

    def compress(teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for bound in losses:
            if top_k is not None:
                teacher, added = bound.term.cached_teacher(teacher, top_k)
                sequence_dims.update(added)
        return teacher

    fingerprint = json.dumps(
        {
            "teacher": recipe.teacher.model_dump() if recipe.teacher else None,
            # every module pass: a student's pass may change what the teacher returns too
            # (prune_vocab reads a causal-LM teacher's logits over the kept tokens)
            "module_passes": [p.model_dump() for p in recipe.module_passes],
            "data": recipe.data.model_dump(),
            "losses": [loss.model_dump() for loss in recipe.losses],
            "teacher_cache": spec.model_dump(),
        },
        sort_keys=True,
        default=str,
    )
    return CacheLayout(sequence_dims, compress, int(spec.memory_mb * 2**20), constants, fingerprint)


def _check_sparse_readers(recipe: Recipe, losses: list[BoundLoss]) -> None:
    """top_k hands the teacher's logits to the terms that keep them sparse; no other term
    may read them."""
    sparse = [b for b in losses if type(b.term).cached_teacher is not LossTerm.cached_teacher]
    if not sparse:
        raise RecipeError(
            recipe.locate(("teacher_cache", "top_k"), prefer_key=True),
            "top_k keeps the teacher's logits as sparse targets, and no loss here reads them so",
            "a kd loss, or teacher_cache without top_k",
        )
    if len(sparse) > 1:
        raise RecipeError(
            recipe.locate(("losses", sparse[1].index)),
            f"losses {', '.join(repr(b.label) for b in sparse)} would each keep sparse "
            "targets of the teacher, and teacher_cache.top_k keeps one set",
            "one kd loss with teacher_cache.top_k, or teacher_cache without top_k",
        )
    for bound in sparse:
        taken = set(bound.term.reads()["teacher"])
        for other in losses:
            shared = taken & set(other.term.reads()["teacher"])
            if other is not bound and shared:
                raise RecipeError(
                    recipe.locate(("losses", other.index)),
                    f"loss {other.label!r} reads the teacher's {', '.join(sorted(shared))}, "
                    f"which teacher_cache.top_k keeps only as loss {bound.label!r}'s sparse "
                    "targets",
                    "teacher_cache without top_k, or one loss reading the teacher's logits",
                )


def _tokens(x: Inputs) -> int | None:
    if isinstance(x, dict):
        first = x.get("input_ids", x.get("attention_mask"))
        if first is None:
            first = next(iter(x.values()))
        return int(first.shape[1]) if first.dim() > 1 else None
    return None


def _fit(value: torch.Tensor, dims: tuple[int, ...], tokens: int | None) -> torch.Tensor:
    """`value` (one sample, no batch dim) cut or zero-padded to `tokens` along `dims`
    (given counting the batch dim)."""
    if tokens is None:
        return value
    for dim in dims:
        d = dim - 1
        have = value.shape[d]
        if have > tokens:
            value = value.narrow(d, 0, tokens)
        elif have < tokens:
            pad = [0, 0] * (value.dim() - 1 - d) + [0, tokens - have]
            value = F.pad(value, pad)
    return value
