"""Errors meant for people: each says what was wrong, where, and what is allowed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """A place in a recipe: file, 1-based line and column, and the key path."""

    file: str
    line: int | None = None
    column: int | None = None
    key_path: str = ""

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        if self.key_path:
            where += f" ({self.key_path})"
        return where


class CompressorError(Exception):
    """Base class: an error whose message is complete enough to show a user as is."""


class RecipeError(CompressorError):
    """A recipe is wrong: the message names file:line:column, the key and what is allowed."""

    def __init__(self, location: Location, problem: str, allowed: str | None = None):
        self.location = location
        self.problem = problem
        self.allowed = allowed
        message = f"{location}: {problem}"
        if allowed:
            message += f"\n  allowed: {allowed}"
        super().__init__(message)


class PluginError(CompressorError):
    """A plugin failed to import, registered a bad hook, or provided a bad component."""


class PassError(CompressorError):
    """A graph pass failed: the message names the pass, the passes before it and the node."""


class CaptureError(CompressorError):
    """A model could not be captured into a torch.fx graph."""


class TrainingStopped(CompressorError):
    """Training stopped on a non-finite loss; the last good checkpoint is kept."""


class ExportError(CompressorError):
    """An exported artifact failed verification against the PyTorch student."""


@dataclass(frozen=True)
class Problem:
    """A problem a plugin's check found, at a key path of the recipe (`()`: the recipe as a
    whole), with what is allowed there when that helps."""

    message: str
    path: tuple[str | int, ...] = ()
    allowed: str | None = None


class RunFailed(CompressorError):
    """Code outside compressor's checks failed during a run (a model, a plugin, torch): the
    message names the phase and the part that failed; the traceback goes to a log file."""

    def __init__(self, phase: str, cause: BaseException):
        self.phase = phase
        self.cause = cause
        super().__init__(f"{phase} failed: {first_line(cause)}")


def first_line(exc: BaseException) -> str:
    """`Type: the message's first line`: how one-line errors name the exception behind them."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


class RecipeErrors(CompressorError):
    """Several recipe problems found in one pass, reported together."""

    def __init__(self, errors: list[RecipeError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


@contextlib.contextmanager
def failure(phase: str) -> Iterator[None]:
    """Errors from code outside compressor's checks (models, plugins, torch) become a
    RunFailed naming `phase`; the pipeline logs their traceback in the run folder."""
    try:
        yield
    except CompressorError:
        raise
    except Exception as exc:
        raise RunFailed(phase, exc) from exc
