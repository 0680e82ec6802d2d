"""Detector latency: measure_latency and torch_runner on structkd.timing."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import structkd.timing as timing
from structkd.models import build_detector, measure_latency, torch_runner


class Recorder(nn.Module):
    """Stands in for a detector: records each call's images, inference mode and train mode, and
    advances ``clock`` (when given) by ``ms_per_image`` per image."""

    def __init__(self, clock: list[float] | None = None, ms_per_image: float = 0.0) -> None:
        super().__init__()
        self.calls: list[tuple[list[torch.Tensor], bool, bool]] = []
        self.clock, self.ms_per_image = clock, ms_per_image

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.calls.append((images, torch.is_inference_mode_enabled(), self.training))
        if self.clock is not None:
            self.clock[0] += self.ms_per_image * len(images) / 1000.0
        return [{} for _ in images]


def test_measure_latency() -> None:
    model = build_detector(
        arch="fcos", num_classes=2, backbone="resnet18", fpn_channels=32, min_size=64, max_size=64
    )
    model.train()
    ms = measure_latency(model, 64, batch=2, warmup=1, iters=2)
    assert ms > 0 and model.training
    with pytest.raises(ValueError, match="iters=0"):
        measure_latency(model, 64, iters=0)


def test_measure_latency_is_the_median_per_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """warmup + iters calls of one batch each, in eval and inference mode; the median call time
    divided by the batch size (a fake clock makes the times exact)."""
    clock = [0.0]
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    model = Recorder(clock, ms_per_image=4.0).train()
    ms = measure_latency(model, 32, batch=3, warmup=2, iters=5)
    assert ms == pytest.approx(4.0)
    assert len(model.calls) == 7 and model.training  # train mode restored
    for images, inference, training in model.calls:
        assert inference and not training
        assert len(images) == 3 and all(im.shape == (3, 32, 32) for im in images)
    assert all(a is b for a, b in zip(model.calls[0][0], model.calls[-1][0], strict=True))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"image_size": 0}, "image_size=0"),
        ({"batch": 0}, "batch=0"),
        ({"warmup": -1}, "warmup=-1"),
        ({"iters": 0}, "iters=0"),
        ({"iters": True}, "iters=True"),
    ],
)
def test_measure_latency_refuses_bad_arguments(kwargs: dict, needle: str) -> None:
    model = Recorder()
    with pytest.raises(ValueError, match=needle):
        measure_latency(model, **{"image_size": 32, **kwargs})
    assert not model.calls


def test_torch_runner_calls_the_model_on_one_fixed_image() -> None:
    model = Recorder().train()
    run = torch_runner(model, 24, seed=3)
    assert not model.training  # eval mode from the start
    assert run() == [{}] and run() == [{}]
    (first, inference, training), (second, _, _) = model.calls
    assert inference and not training
    assert len(first) == 1 and first[0].shape == (3, 24, 24)
    assert first[0] is second[0]  # the same image every call
    again = Recorder()
    torch_runner(again, 24, seed=3)()
    other = Recorder()
    torch_runner(other, 24, seed=4)()
    assert torch.equal(again.calls[0][0][0], first[0])
    assert not torch.equal(other.calls[0][0][0], first[0])
    assert float(first[0].min()) >= 0 and float(first[0].max()) <= 1
