"""metrics.jsonl: one JSON record per logged step, written by the leader rank alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compressor.world import World

METRICS = "metrics.jsonl"


class Metrics:
    """A run's metrics file. A fresh run starts it empty; a resumed run drops what a killed run
    logged past its checkpoint, and `earlier` hands every rank what was kept. Each record also
    goes to the `compressor_metrics_logged` hook."""

    def __init__(self, run_dir: Path, hooks: Any, world: World, resumed_at: int | None):
        self.path, self.run_dir, self.hooks, self.world = run_dir / METRICS, run_dir, hooks, world
        if world.leader:
            if resumed_at is None:
                self.path.unlink(missing_ok=True)
            else:
                _truncate_metrics(self.path, resumed_at)
        self.resumed = resumed_at is not None

    def earlier(self) -> list[dict[str, Any]]:
        """The records kept from before a resume, on every rank (a collective call)."""
        kept = read_metrics(self.path) if self.resumed and self.world.leader else []
        return self.world.from_leader(kept)

    def log(self, record: dict[str, Any]) -> None:
        if not self.world.leader:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.hooks.compressor_metrics_logged(record=record, run_dir=self.run_dir)

    def history(self) -> list[dict[str, Any]]:
        """Every record of the run, on every rank (a collective call)."""
        return self.world.from_leader(read_metrics(self.path) if self.world.leader else [])


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, step: int) -> None:
    """A killed run may have logged past its last checkpoint; resume rewrites those steps."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
