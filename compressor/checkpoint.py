"""Atomic checkpoints: a folder is written under a temporary name, then renamed.

Each holds student.safetensors (the student's state dict), losses.safetensors (learned loss
pieces such as projections) and state.pt (optimizer, schedule, RNG, step), read back with
`torch.load(weights_only=True)` so loading one never runs code. A run of several ranks
writes torch.distributed.checkpoint folders instead (every rank its shards, one `.metadata`),
which resume at any world size, one process included.
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

from compressor.distributed import World, is_distributed_checkpoint, save_distributed

LATEST = "latest"


@dataclass
class Checkpoint:
    path: Path
    step: int


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
