"""Atomic checkpoints: a folder is written under a temporary name, then renamed.

Each holds student.safetensors (the student's state dict), losses.safetensors (learned loss
pieces such as projections) and state.pt (optimizer, schedule, RNG, step), read back with
`torch.load(weights_only=True)` so loading one never runs code. A run of several ranks
writes torch.distributed.checkpoint folders instead (every rank its shards, one `.metadata`),
which resume at any world size, one process included.

`Checkpoints` is what the training loop sees: `save` and `restore`, the same calls whether one
process or several run and whichever kind of checkpoint a run resumes from.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from compressor.distributed import (
    World,
    is_distributed_checkpoint,
    load_distributed,
    load_plain_optimizer,
    save_distributed,
    trainable_names,
)
from compressor.errors import CompressorError

LATEST = "latest"


@dataclass
class Checkpoint:
    path: Path
    step: int


@dataclass
class TrainState:
    """What a checkpoint holds: the student's training graph and the losses' learned pieces
    (plain modules), the step as wrapped for this world's ranks (`Parallel.module`), and the
    optimizer and schedule that move them."""

    student: nn.Module
    losses: nn.Module
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a torch LRScheduler


class Checkpoints:
    """A run's checkpoints folder as this world sees it. One process writes plain checkpoints,
    several write torch.distributed.checkpoint folders; either kind resumes at any world size.
    `last` is the newest checkpoint written or resumed from (what a failure message points to).

    Resuming takes two calls: `restore_weights` before the step is wrapped for several ranks
    (FSDP shards the weights it finds), `restore` once the optimizer and schedule exist."""

    def __init__(self, folder: Path, world: World, keep: int):
        self.folder, self.world, self.keep = folder, world, keep
        self.last: Checkpoint | None = None
        self._saved: dict[str, Any] | None = None  # a plain checkpoint's state, until restored

    def resume_point(self) -> Checkpoint:
        """The checkpoint --resume continues from; an error for people when there is none."""
        last = latest_checkpoint(self.folder)
        if last is None:
            raise CompressorError(f"--resume: no checkpoint in {self.folder}; run without --resume")
        self.last = last
        return last

    def restore_weights(
        self, checkpoint: Checkpoint, student: nn.Module, losses: nn.Module
    ) -> None:
        """A plain checkpoint's weights into the unwrapped modules; a distributed one is read
        whole by `restore`."""
        if not is_distributed_checkpoint(checkpoint.path):
            self._saved = load_checkpoint(checkpoint, student, losses)

    def restore(self, checkpoint: Checkpoint, state: TrainState) -> int:
        """The optimizer, schedule and RNG (and a distributed checkpoint's weights) as saved;
        returns the step the run continues from."""
        saved = self._saved
        if saved is None:
            rest = {"scheduler": state.scheduler.state_dict(), "rng": torch.get_rng_state()}
            saved = load_distributed(checkpoint.path, state.wrapped, state.optimizer, rest)
        elif self.world.size > 1:  # one process's optimizer state, keyed by position
            names = trainable_names(state.wrapped)
            load_plain_optimizer(state.wrapped, names, state.optimizer, saved["optimizer"])
        else:
            state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        self._saved = None
        return checkpoint.step

    def save(self, step: int, state: TrainState) -> Checkpoint:
        """Every rank its shards (the optimizer's included) when several run; else one plain
        checkpoint of the student's training graph (its weights and what passes added)."""
        rest = {"scheduler": state.scheduler.state_dict(), "rng": torch.get_rng_state()}
        if self.world.size > 1:
            self.last = save_distributed_checkpoint(
                self.folder, step, self.world, state.wrapped, state.optimizer, rest, self.keep
            )
        else:
            rest["optimizer"] = state.optimizer.state_dict()
            self.last = save_checkpoint(
                self.folder, step, state.student, state.losses, rest, self.keep
            )
        return self.last


def save_checkpoint(
    folder: Path, step: int, student: nn.Module, losses: nn.Module, state: dict[str, Any], keep: int
) -> Checkpoint:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:07d}"
    tmp = folder / f".tmp-step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_model(student, str(tmp / "student.safetensors"))
        save_model(losses, str(tmp / "losses.safetensors"))
        with open(tmp / "state.pt", "wb") as f:  # a Python file: a failing write is an OSError
            torch.save({"step": step, **state}, f)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint stays the latest
        raise
    return _commit(folder, tmp, final, step, keep)


def save_distributed_checkpoint(
    folder: Path,
    step: int,
    world: World,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
) -> Checkpoint:
    """The same folder layout and commit, written by every rank with
    torch.distributed.checkpoint: each rank its shards, rank 0 the rename and the pointer."""
    final = folder / f"step_{step:07d}"
    tmp = folder / f".tmp-step_{step:07d}"
    if world.leader:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    world.barrier()
    extra = {"step": step, "scheduler": state["scheduler"], "rng": state["rng"]}
    try:
        save_distributed(tmp, module, optimizer, extra)
    except BaseException:
        if world.leader:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    world.barrier()  # every rank's shards are written
    if world.leader:
        _commit(folder, tmp, final, step, keep)
    world.barrier()
    return Checkpoint(final, step)


def _commit(folder: Path, tmp: Path, final: Path, step: int, keep: int) -> Checkpoint:
    """The written folder becomes the latest checkpoint; older ones past `keep` go."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomic(folder / LATEST, final.name)
    for old in sorted(p for p in folder.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return Checkpoint(final, step)


def latest_checkpoint(folder: Path) -> Checkpoint | None:
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    path = folder / pointer.read_text().strip()
    if not ((path / "state.pt").is_file() or is_distributed_checkpoint(path)):
        return None
    return Checkpoint(path, int(path.name.removeprefix("step_")))


def load_checkpoint(
    checkpoint: Checkpoint, student: nn.Module, losses: nn.Module
) -> dict[str, Any]:
    load_model(student, str(checkpoint.path / "student.safetensors"))
    load_model(losses, str(checkpoint.path / "losses.safetensors"))
    return dict(torch.load(checkpoint.path / "state.pt", weights_only=True))


def write_atomic(path: Path, text: str) -> None:
    """`path` holds either its old text or `text`, never a part: written aside, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
