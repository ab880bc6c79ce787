"""CUDA-event section timing: asynchronous read-back logic (fake events on CPU, real on GPU)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from step_infra.telemetry import Recorder, RecorderConfig, Window
from step_infra.telemetry.cuda_timing import CudaTimer


class FakeEvent:
    """Stands in for torch.cuda.Event: completes only when the test says the GPU got there."""

    clock = 0.0

    def __init__(self, enable_timing: bool = True) -> None:
        self.t: float | None = None
        self.done = False
        self.queries = 0

    def record(self) -> None:
        FakeEvent.clock += 1.0
        self.t = FakeEvent.clock
        self.done = False

    def query(self) -> bool:
        self.queries += 1
        return self.done

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.t is not None and end.t is not None
        return (end.t - self.t) * 1000.0  # ms


def _fake_torch() -> SimpleNamespace:
    return SimpleNamespace(cuda=SimpleNamespace(Event=FakeEvent, is_available=lambda: True))


def test_pending_pairs_are_read_only_once_complete_and_never_waited_for() -> None:
    timer = CudaTimer(_fake_torch(), max_pending=2)
    start = timer.start()
    timer.stop("fwd", 3, start)
    assert timer.poll() == []  # not complete: poll returns at once instead of blocking
    assert timer.oldest_pending_step() == 3
    end = timer._pending[0][3]
    end.done = True
    (record,) = timer.poll()
    assert record[1:4] == ("fwd", 3, 1.0)  # 1 fake-clock unit = 1000 ms = 1.0 s
    assert len(timer) == 0 and timer.oldest_pending_step() is None
    # Bounded: beyond max_pending a pair is dropped and counted.
    for i in range(3):
        timer.stop("bwd", i, timer.start())
    assert len(timer) == 2 and timer.dropped == 1


def test_recorder_waits_for_cuda_sections_before_closing_a_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torch", _fake_torch())
    windows: list[Window] = []

    class Sink:
        def write_window(self, window: Window) -> None:
            windows.append(window)

        def close(self) -> None:
            pass

    rec = Recorder(RecorderConfig(window_steps=1, cuda_events=True, flush_interval_s=10), [Sink()])
    rec.begin_step(0)
    with rec.section("fwd"):
        pass
    rec.end_step()
    assert rec._export(final=False) == 0  # the GPU has not reached the end event yet
    assert rec._cuda is not None
    rec._cuda._pending[0][3].done = True
    assert rec._export(final=False) == 1
    assert windows[0].sections["fwd"].count == 1
    rec.close()


@pytest.mark.gpu
def test_real_cuda_events_time_gpu_work_without_synchronizing() -> None:
    torch = pytest.importorskip("torch")
    windows: list[Window] = []

    class Sink:
        def write_window(self, window: Window) -> None:
            windows.append(window)

        def close(self) -> None:
            pass

    a = torch.randn(4096, 4096, device="cuda")
    cfg = RecorderConfig(window_steps=5, flush_interval_s=0.05)
    with Recorder(cfg, [Sink()]) as rec:
        assert rec._cuda is not None
        for step in range(10):
            rec.begin_step(step)
            t0 = time.perf_counter()
            with rec.section("matmul"):
                for _ in range(4):
                    a = (a @ a).tanh()
            launch_s = time.perf_counter() - t0
            rec.end_step()
        torch.cuda.synchronize()  # the test, not the recorder, waits for the GPU
    sections = [w.sections["matmul"] for w in windows if "matmul" in w.sections]
    assert sum(s.count for s in sections) == 10
    # GPU time of 4 large matmuls exceeds the host's launch time of them.
    assert max(s.p50 for s in sections) > launch_s
