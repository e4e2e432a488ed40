"""Faults injected into a real `compress` process, for tests/test_faults.py.

Loaded with `compress -p fault_injection ...` (tests/ on PYTHONPATH); COMPRESSOR_FAULT picks the
fault:

- `kill_at_step:N`        SIGKILL once step N is logged (log_every: 1)
- `kill_in_checkpoint:N`  SIGKILL after the student file of step N's checkpoint is written
- `fsize_in_checkpoint:N` a file-size limit of 1 KiB from step N's checkpoint on: its writes fail
- `kill_in_export`        SIGKILL after export, with the first artifact cut to half its size
- `kill_in_report`        SIGKILL with report.json half written
- `kill_rank_at_step:R:N` under torchrun: rank R SIGKILLs itself as step N begins
"""

from __future__ import annotations

import os
import resource
import signal
from pathlib import Path
from typing import Any

import compressor.checkpoint
import compressor.engine
import compressor.pipeline
from compressor import hookimpl

FAULT, _, ARG = os.environ.get("COMPRESSOR_FAULT", "").partition(":")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@hookimpl
def compressor_metrics_logged(record: dict[str, Any], run_dir: Path) -> None:
    if FAULT == "kill_at_step" and record["step"] == int(ARG) and "loss" in record:
        _die()


@hookimpl(tryfirst=True)
def compressor_write_report(report: dict[str, Any], run_dir: Path) -> None:
    if FAULT == "kill_in_report":
        (run_dir / "report.json").write_text('{"name": "half a rep')
        _die()


_save_model = compressor.checkpoint.save_model
_export_artifacts = compressor.pipeline.export_artifacts


def _faulty_save_model(model: Any, filename: str, *args: Any, **kwargs: Any) -> Any:
    in_step = f".tmp-step_{int(ARG or 0):07d}" in filename
    if FAULT == "fsize_in_checkpoint" and in_step:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write, not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
    result = _save_model(model, filename, *args, **kwargs)
    if FAULT == "kill_in_checkpoint" and in_step:
        _die()
    return result


def _faulty_export(plan: Any, out_dir: Path) -> Any:
    artifacts = _export_artifacts(plan, out_dir)
    if FAULT == "kill_in_export":
        first = Path(artifacts[0].result.path)
        first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
        _die()
    return artifacts


_batch_indices = compressor.engine.batch_indices


def _faulty_batch_indices(step: int, *args: Any, **kwargs: Any) -> Any:
    rank, _, at = ARG.partition(":")
    if FAULT == "kill_rank_at_step" and os.environ.get("RANK") == rank and step + 1 == int(at):
        _die()
    return _batch_indices(step, *args, **kwargs)


compressor.checkpoint.save_model = _faulty_save_model
compressor.engine.batch_indices = _faulty_batch_indices
compressor.pipeline.export_artifacts = _faulty_export
