"""What the benchmarks that measure memory in fresh processes share (`losses`, `llm`,
`distributed`): resident-set readings, the allocator settings that make them honest, and
`python -m compressor.bench` run in a subprocess for one measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# glibc returns freed blocks at once, so the resident set shows what is held
HONEST_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def rss(field: str) -> int:
    """A memory field of /proc/self/status in bytes: VmRSS (now) or VmHWM (the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_rss_peak() -> None:
    """Reset the resident high-water mark (VmHWM) to the resident set now."""
    Path("/proc/self/clear_refs").write_text("5")


def measure_in_subprocess(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """`python -m compressor.bench ARGS` in a fresh process: its last line of JSON, or
    {"error": its last line of stderr}."""
    result = subprocess.run(
        [sys.executable, "-m", "compressor.bench", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))
