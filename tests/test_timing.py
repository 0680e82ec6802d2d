"""structkd.timing: rounds and warm-up honoured, calls interleaved, CUDA synchronised, medians."""

from __future__ import annotations

import types

import pytest
import torch

import structkd.timing as timing
from structkd.timing import Timing, interleaved, time_call


class FakeClock:
    """Stands in for ``time`` in ``structkd.timing``: ``perf_counter`` reads ``now`` (s)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += ms / 1000.0


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def _recorder(log: list[str], name: str):
    def run() -> str:
        log.append(name)
        return name

    return run


def test_rounds_and_warmup_are_honoured_and_calls_interleave() -> None:
    log: list[str] = []
    result = interleaved({"a": _recorder(log, "a"), "b": _recorder(log, "b")}, rounds=3,
                         warmup=2)
    assert log == ["a", "b"] * 5  # 2 warm-up rounds, then 3 timed ones, A,B,A,B,...
    assert set(result) == {"a", "b"}
    assert all(len(t.times_ms) == 3 and min(t.times_ms) >= 0 for t in result.values())
    log.clear()
    interleaved({"a": _recorder(log, "a"), "b": _recorder(log, "b"), "c": _recorder(log, "c")},
                rounds=1, warmup=0)
    assert log == ["a", "b", "c"]


def test_time_call_defaults() -> None:
    log: list[str] = []
    result = time_call(_recorder(log, "f"))
    assert isinstance(result, Timing)
    assert len(log) == 12 and len(result.times_ms) == 10  # warmup=2, rounds=10
    log.clear()
    assert len(time_call(_recorder(log, "f"), rounds=4, warmup=0).times_ms) == 4
    assert len(log) == 4


def test_times_median_and_min(clock: FakeClock) -> None:
    """Only the timed calls are measured, each in milliseconds; warm-up time is left out."""
    durations = {"a": iter([100.0, 5.0, 1.0, 3.0]), "b": iter([200.0, 2.0, 4.0, 8.0])}

    def runner(name: str):
        return lambda: clock.advance_ms(next(durations[name]))

    result = interleaved({n: runner(n) for n in durations}, rounds=3, warmup=1)
    assert result["a"].times_ms == pytest.approx((5.0, 1.0, 3.0))
    assert result["b"].times_ms == pytest.approx((2.0, 4.0, 8.0))
    assert result["a"].median_ms == pytest.approx(3.0) and result["a"].min_ms == pytest.approx(1.0)
    assert result["b"].median_ms == pytest.approx(4.0) and result["b"].min_ms == pytest.approx(2.0)
    even = Timing((4.0, 1.0, 10.0, 2.0))
    assert even.median_ms == 3.0 and even.min_ms == 1.0  # mean of the two middle values


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"rounds": 0}, "rounds=0"),
        ({"rounds": -2}, "rounds=-2"),
        ({"rounds": 2.5}, "rounds=2.5"),
        ({"rounds": True}, "rounds=True"),
        ({"warmup": -1}, "warmup=-1"),
        ({"warmup": 1.0}, "warmup=1.0"),
        ({"warmup": False}, "warmup=False"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs: dict, needle: str) -> None:
    log: list[str] = []
    with pytest.raises(ValueError, match=needle):
        interleaved({"a": _recorder(log, "a")}, **kwargs)
    with pytest.raises(ValueError, match=needle):
        time_call(_recorder(log, "a"), **kwargs)
    assert not log  # refused before any call


def test_cuda_device_is_synchronised_around_every_timed_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With a CUDA device the calls are synchronised (checked with a stand-in for
    ``torch.cuda.synchronize``, so no GPU is needed); with a CPU device or none, never."""
    log: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    runners = {"a": _recorder(log, "a"), "b": _recorder(log, "b")}
    interleaved(runners, rounds=2, warmup=1, device="cuda")
    timed = ["sync", "a", "sync", "sync", "b", "sync"]
    assert log == ["a", "b", "sync", *timed, *timed]
    for device in ("cpu", torch.device("cpu"), None):
        log.clear()
        interleaved(runners, rounds=2, warmup=1, device=device)
        assert "sync" not in log and len(log) == 6
