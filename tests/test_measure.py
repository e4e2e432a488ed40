"""What the report measures: latency of every model and artifact timed in interleaved rounds,
and sizes counted over what each graph's outputs read."""

from __future__ import annotations

import time

import pytest
import torch
from torch import fx, nn

from compressor.errors import RunFailed
from compressor.measure import Timed, _used_state, interleaved_medians


def _recorder(name: str, calls: list[str], seconds: float = 0.0):
    def run(inputs):
        calls.append(f"{name}@{inputs[0].shape[0]}")
        if seconds:
            time.sleep(seconds)

    return run


def test_rounds_interleave_every_entry_and_rotate_who_goes_first():
    calls: list[str] = []
    batches = {1: torch.zeros(1), 4: torch.zeros(4)}
    timed = [Timed("teacher", "onnx", _recorder("t", calls), batches)]
    timed.append(Timed("student", "onnx", _recorder("s", calls), batches))
    medians = interleaved_medians(timed, rounds=3, warm_seconds=0.0)
    warm, rounds = calls[:12], calls[12:]
    assert warm == ["t@1"] * 3 + ["t@4"] * 3 + ["s@1"] * 3 + ["s@4"] * 3
    # each timed call follows a call of the same entry and batch (warm threads and caches)
    order = ["t", "s", "s", "t", "t", "s"]  # the first entry moves one on every round
    assert rounds == [f"{who}@{b}" for who in order for b in (1, 4) for _ in range(2)]
    assert [set(m) for m in medians] == [{1, 4}, {1, 4}]


def test_each_timed_call_follows_calls_of_its_own_for_the_warm_time():
    calls: list[str] = []
    timed = [Timed("teacher", "onnx", _recorder("t", calls, 0.004), {2: torch.zeros(2)})]
    interleaved_medians(timed, rounds=1, warm_seconds=0.01)
    # 3 warm-up calls, then at least 0.01 s of calls (3 of 0.004 s), then the timed one
    assert len(calls) >= 3 + 3 + 1


def test_medians_are_each_entrys_own_time():  # lower bounds only: sleeps never end early
    timed = [
        Timed("teacher", "onnx", _recorder("t", [], 0.02), {2: torch.zeros(2)}),
        Timed("student", "onnx", _recorder("s", [], 0.005), {2: torch.zeros(2)}),
    ]
    teacher, student = interleaved_medians(timed, rounds=3)
    assert teacher[2] >= 0.02 and student[2] >= 0.005


def test_an_artifact_that_fails_to_run_is_named():
    def broken(inputs):
        raise RuntimeError("no such input: pixel_values")

    timed = [Timed("student", "onnx_int8", broken, {2: torch.zeros(2)})]
    with pytest.raises(RunFailed, match="the student's onnx_int8 artifact"):
        interleaved_medians(timed, rounds=1)


def test_a_bench_burst_follows_untimed_calls_of_its_own():
    """`compress bench` times bursts of one candidate after another's: each burst starts
    after WARM_SECONDS of untimed calls of its own (at least one)."""
    from compressor.bench.deploy import _time_calls

    calls: list[str] = []
    times = _time_calls(lambda x: calls.append("c") or time.sleep(0.004), None, 3, 1.0)
    assert len(times) == 3
    assert len(calls) >= 6 + 3  # 0.025 s of 0.004 s calls (6 at least), then the 3 timed


class _Pooled(nn.Module):
    """An encoder whose pooler no output reads, and a head tied to its embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.pooler = nn.Linear(4, 4)
        self.register_buffer("scale", torch.ones(4))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids) * self.scale
        self.pooler(hidden[:, 0])  # computed, never returned: dead code
        return self.head(hidden)


def test_sizes_count_what_the_outputs_read_and_a_tied_weight_once():
    graph = fx.symbolic_trace(_Pooled())
    assert any(n.target == "pooler" for n in graph.graph.nodes)  # the graph still calls it
    used = _used_state(graph)
    assert used["parameters"] == 10 * 4  # the tied table; not the pooler's 4 * 4 + 4
    assert used["state_bytes"] == (10 * 4 + 4) * 4  # + the buffer the output reads
