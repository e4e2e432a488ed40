"""The run folder is the run's alone.

- **Lock.** A run holds an exclusive `flock` on `<run>/.lock` from its claim to its end; the
  file names the holder (pid, host, start, command). A second run into the folder is refused
  with that name. The kernel drops the lock when its process dies, so a killed run leaves a
  stale lock file that the next run (normally `--resume`) detects and takes over.
- **Ownership.** The run records the top-level entries it wrote in `<run>/.owned.json`, at each
  phase's end and when it stops. Overwriting removes only those (and the core's own files);
  a folder holding anything else is refused, so pointing `output=` at a folder of one's own
  loses nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compressor.checkpoint import latest_checkpoint, write_atomic
from compressor.errors import CompressorError, RecipeError
from compressor.recipe import Recipe

LOCK = ".lock"
OWNED = ".owned.json"
# What the core itself writes; plugins' files (the report's) are recorded as they appear.
CORE_ENTRIES = frozenset(
    {
        LOCK,
        OWNED,
        f".{OWNED}.tmp",
        "recipe.yaml",
        "metrics.jsonl",
        "checkpoints",
        "teacher_cache",
        "stages",
        "baseline",
        "export",
        "student.safetensors",
        "error.log",
        "bench",  # compress bench
    }
)


class RunFolder:
    """A claimed run folder: locked while open; `record()` notes what the run wrote so far."""

    def __init__(self, path: Path, lock_fd: int, foreign: set[str]):
        self.path = path
        self._fd = lock_fd
        self.foreign = foreign  # not the run's, though it continues beside them (--resume)

    def record(self) -> None:
        owned = sorted({p.name for p in self.path.iterdir()} - self.foreign)
        write_atomic(self.path / OWNED, json.dumps({"entries": owned}, indent=1) + "\n")

    def release(self) -> None:
        with contextlib.suppress(OSError):  # a full disk must not hide the run's own error
            self.record()
        _unlock(self.path, self._fd)


def check_output(recipe: Recipe) -> None:
    """The run folder can be made and written: checked before anything is loaded."""
    reason = unwritable_reason(recipe.run_dir())
    if reason is not None:
        key = ("output",) if recipe.output else ("name",)
        raise RecipeError(
            recipe.locate(key),
            f"the run folder {recipe.run_dir()} cannot be written: {reason}",
            "output: a folder this user can create or write",
        )


def unwritable_reason(run_dir: Path) -> str | None:
    """Why a run folder could not be made or written at `run_dir`, or None when it can."""
    path = Path(os.path.abspath(run_dir))
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a folder"
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, so no folder can be made inside it"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user"
    with contextlib.suppress(OSError):
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            return f"{existing} is on a read-only file system"
    return None


@contextlib.contextmanager
def claim(run_dir: Path, resume: bool, overwrite: bool) -> Iterator[RunFolder]:
    """Lock `run_dir` for this run and make it ready: new, emptied of an earlier run's files
    (`overwrite`, or what a run that failed before its first checkpoint left) or kept as it
    is to continue (`resume`). Refused when another run holds it, when it holds files no run
    wrote, or when it holds a run and neither flag says what to do with it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CompressorError(f"cannot create the run folder {run_dir}: {exc.strerror}") from exc
    fd, stale = _lock(run_dir)
    _write_holder(fd, _me())  # at once: a run refused from now on can name this one
    try:
        foreign = _prepare(run_dir, resume, overwrite, claimed_before=stale is not None)
    except BaseException:
        # refused: nothing recorded, the folder as it was (a killed run's lock file included)
        if stale:
            _write_holder(fd, stale)
        _unlock(run_dir, fd, remove=stale is None)
        raise
    if stale:
        print(
            f"note: took over the lock of run {_holder(stale)}, which no longer runs",
            file=sys.stderr,
        )
    folder = RunFolder(run_dir, fd, foreign)
    try:
        folder.record()
        yield folder
    finally:
        folder.release()


def _prepare(run_dir: Path, resume: bool, overwrite: bool, claimed_before: bool) -> set[str]:
    """Check the folder's state against the flags and clear it for a new run; the entries
    that are not the run's (only --resume goes on beside them)."""
    owned = _owned(run_dir, claimed_before)
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in owned)
    if foreign and not resume:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise CompressorError(
            f"run folder {run_dir} holds files no run wrote ({shown}); a run writes only into "
            "a new or empty folder or one of its own runs, so nothing of yours is replaced. "
            "Choose output=NEW_FOLDER, or move those files"
        )
    folders = [run_dir / "checkpoints", *run_dir.glob("stages/*/checkpoints")]
    resumable = any(latest_checkpoint(f) is not None for f in folders)
    resumable = resumable or any(run_dir.glob("stages/*/done.json"))
    if resume:
        if not resumable:
            raise CompressorError(f"--resume: {run_dir} has no checkpoint to resume from")
        return set(foreign)
    if (resumable or (run_dir / "report.json").is_file()) and not overwrite:
        raise CompressorError(
            f"run folder {run_dir} already holds a run; pass --resume to continue it, "
            "--overwrite to replace it, or output=OTHER_FOLDER"
        )
    for entry in run_dir.iterdir():  # all the run's own by now
        if entry.name in (LOCK, OWNED):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return set()


def _owned(run_dir: Path, claimed_before: bool) -> set[str]:
    """What a run wrote here. The core's names count only in a folder a run has claimed (a
    record, or a killed run's lock): a folder of one's own with a recipe.yaml is not a run's."""
    claimed = claimed_before or (run_dir / OWNED).exists()
    try:
        recorded = json.loads((run_dir / OWNED).read_text())["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = []
    core = CORE_ENTRIES if claimed else {LOCK}
    return set(core) | {str(name) for name in recorded}


def _lock(run_dir: Path) -> tuple[int, dict[str, Any] | None]:
    """An exclusive lock on run_dir/.lock; (fd, the stale holder it replaced, if any)."""
    path = run_dir / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise CompressorError(f"cannot lock the run folder {run_dir}: {exc}") from exc
            who = f" by run {_holder(holder)}" if holder else " by another run, starting up"
            raise CompressorError(
                f"run folder {run_dir} is in use{who}; wait for it to end, or choose "
                "output=OTHER_FOLDER"
            ) from None
        # the holder before us may have removed the file between our open and our lock
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, _read_holder(fd)
        os.close(fd)


def _unlock(run_dir: Path, fd: int, remove: bool = True) -> None:
    lock = run_dir / LOCK
    with contextlib.suppress(OSError):
        if remove and os.fstat(fd).st_ino == os.stat(lock).st_ino:
            lock.unlink()
    os.close(fd)


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        text = os.pread(fd, 4096, 0).decode()
        holder = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _me() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }


def _write_holder(fd: int, holder: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)


def _holder(holder: dict[str, Any]) -> str:
    return (
        f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')}: "
        f"{holder.get('command')})"
    )


OVERRIDES_HEADER = "\n# command-line overrides:\n"


def write_recipe_copy(
    recipe: Recipe, run_dir: Path, overrides: tuple[str, ...] | list[str]
) -> None:
    text = recipe.path.read_text()
    if overrides:
        text += OVERRIDES_HEADER + "".join(f"#   {o}\n" for o in overrides)
    (run_dir / "recipe.yaml").write_text(text)


def recorded_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides a run was started with, from its recipe copy."""
    _, header, listed = (run_dir / "recipe.yaml").read_text().partition(OVERRIDES_HEADER)
    return [line.removeprefix("#   ") for line in listed.splitlines()] if header else []
