"""Training progress on stderr: a tqdm bar on a terminal, a line every 5% of the steps in
logs, with a steady-state rate that leaves out warm-up, evaluation and checkpoints."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm


class Progress:
    """Step, loss terms, steady-state rate and ETA. On a terminal a tqdm bar; otherwise (logs,
    CI) one line every 5% of the steps. The rate leaves out warm-up (the first steps, where
    kernels compile) and the time spent evaluating and checkpointing."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.total, self.start, self.enabled = total, start, enabled
        self.tty = sys.stderr.isatty()
        self.warmup = start + max(1, min(10, (total - start) // 50))
        self.timed_steps, self.timed_seconds = 0, 0.0
        self.mark = time.perf_counter()
        self.began = self.mark
        self.terms = ""
        self.last_line = -1
        self.bar = _Bar(
            total=total,
            initial=start,
            disable=not (enabled and self.tty),
            file=sys.stderr,
            unit="step",
            dynamic_ncols=True,
            leave=True,
        )

    def advance(self, step: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if step > self.warmup:
            self.timed_steps += 1
            self.timed_seconds += now - self.mark
        self.mark = now
        self.bar.steady_rate = self.rate()
        self.bar.update(1)
        if not self.tty and (step * 20 // self.total != self.last_line):
            self.last_line = step * 20 // self.total
            print(self.line(step), file=sys.stderr, flush=True)

    def rate(self) -> float:
        """Steady-state steps per second; 0 (shown as '?') until warm-up is over."""
        return self.timed_steps / self.timed_seconds if self.timed_seconds > 0 else 0.0

    def line(self, step: int) -> str:
        return tqdm.format_meter(
            step,
            self.total,
            time.perf_counter() - self.began,
            initial=self.start,
            unit="step",
            rate=self.rate(),
            postfix=self.terms,
            ncols=0,
        )

    def show_terms(self, values: dict[str, float]) -> None:
        self.terms = " ".join(f"{k}={v:.4f}" for k, v in values.items())
        self.bar.set_postfix_str(self.terms, refresh=False)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count towards the rate."""
        try:
            yield
        finally:
            self.mark = time.perf_counter()

    def note(self, text: str) -> None:
        if self.enabled:
            if self.tty:
                self.bar.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


class _Bar(tqdm):
    """tqdm with our steady-state rate in place of its own average (which counts warm-up)."""

    steady_rate = 0.0

    @property
    def format_dict(self) -> dict[str, Any]:
        info = dict(super().format_dict)
        info["rate"] = self.steady_rate
        return info
