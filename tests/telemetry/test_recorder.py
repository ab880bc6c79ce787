"""Recorder: sections, counters, gauges, collectives, windows, drops, bounded memory."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from step_infra.telemetry import Recorder, RecorderConfig, Window
from step_infra.telemetry.ring import RingBuffer


class ListSink:
    def __init__(self) -> None:
        self.windows: list[Window] = []
        self.closed = False

    def write_window(self, window: Window) -> None:
        self.windows.append(window)

    def close(self) -> None:
        self.closed = True


STALL_S = 2.0  # the slow sink's first export; the hot-path bound below is half of it


class SlowSink(ListSink):
    def write_window(self, window: Window) -> None:
        if not self.windows:
            time.sleep(STALL_S)  # the first export stalls; the training thread must not
        super().write_window(window)


def _steps(rec: Recorder, n: int, *, start: int = 0) -> None:
    for step in range(start, start + n):
        rec.begin_step(step)
        with rec.section("fwd"):
            time.sleep(0.001)
        with rec.section("bwd"):
            time.sleep(0.002)
        with rec.collective("grad_allreduce"):
            pass
        rec.counter("samples", 4)
        rec.gauge("lr", 0.1)
        rec.end_step(loss=1.0 / (step + 1), tokens=1000, flops=1e9, data_wait_s=0.0005)


def test_ring_buffer_drops_and_counts_when_full() -> None:
    ring: RingBuffer[int] = RingBuffer(3)
    assert [ring.append(i) for i in range(5)] == [True, True, True, False, False]
    assert ring.dropped == 2 and ring.appended == 3
    assert ring.drain(2) == [0, 1]
    assert ring.append(9)
    assert ring.drain() == [2, 9]
    with pytest.raises(ValueError, match="capacity"):
        RingBuffer(0)


def test_windows_aggregate_sections_per_window() -> None:
    sink = ListSink()
    cfg = RecorderConfig(rank=3, node="hostA", window_steps=5, peak_flops_per_s=1e12)
    with Recorder(cfg, [sink]) as rec:
        _steps(rec, 12)
    assert sink.closed
    # Two full windows of 5 steps, then the last 2 steps flushed at close.
    assert [(w.first_step, w.last_step) for w in sink.windows] == [(0, 4), (5, 9), (10, 11)]
    w = sink.windows[0]
    assert w.rank == 3 and w.node == "hostA"
    assert set(w.sections) == {"fwd", "bwd"}
    assert w.sections["bwd"].count == 5
    assert 0.0015 < w.sections["bwd"].p50 < 0.05
    assert w.sections["bwd"].p50 <= w.sections["bwd"].p90 <= w.sections["bwd"].max
    assert w.sections["fwd"].p50 < w.sections["bwd"].p50
    assert "grad_allreduce" in w.arrivals
    assert w.counters["samples"] == 20.0
    assert w.step_time is not None and w.step_time.count == 5
    for name in ("loss", "lr", "tokens_per_s", "mfu", "data_wait_s", "rss_bytes"):
        assert name in w.gauges, name
    assert w.gauges["loss"] == pytest.approx(1.0 / 5)
    assert 0 < w.gauges["mfu"] < 1
    # Per-step detail rows, tagged with the rank and node.
    assert set(w.detail["rank"]) == {3} and set(w.detail["node"]) == {"hostA"}
    assert sorted(set(w.detail["step"])) == [0, 1, 2, 3, 4]


def test_background_thread_exports_without_flush() -> None:
    sink = ListSink()
    rec = Recorder(RecorderConfig(window_steps=2, flush_interval_s=0.05), [sink])
    _steps(rec, 4)
    deadline = time.monotonic() + 5
    while len(sink.windows) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(sink.windows) == 2
    rec.close()


def test_hot_path_never_waits_for_a_slow_sink() -> None:
    sink = SlowSink()
    rec = Recorder(RecorderConfig(window_steps=1, flush_interval_s=0.01), [sink])
    t0 = time.perf_counter()
    for step in range(20):
        rec.begin_step(step)
        rec.end_step()
        time.sleep(0.005)
    hot = time.perf_counter() - t0
    # 20 steps sleep 0.1 s in all; a hot path that waited for the export would take more than
    # STALL_S. Half of it leaves a loaded machine its scheduling delays and still catches that.
    assert hot < STALL_S / 2, f"20 steps took {hot:.2f}s although export is slow: hot path blocked"
    rec.close()
    assert sum(w.steps for w in sink.windows) == 20


def test_failing_sink_is_counted_not_raised() -> None:
    class Broken(ListSink):
        def write_window(self, window: Window) -> None:
            raise OSError("disk full")

    rec = Recorder(RecorderConfig(window_steps=1), [Broken()])
    _steps(rec, 3)
    rec.close()
    assert rec.export_errors == 3


def test_too_many_names_fold_into_other() -> None:
    sink = ListSink()
    with Recorder(RecorderConfig(max_names=4, window_steps=1), [sink]) as rec:
        rec.begin_step(0)
        for i in range(10):
            rec.counter(f"c{i}")
        rec.end_step()
    assert rec.names_folded == 6
    assert sink.windows[0].counters["other"] == 6.0


def test_end_step_before_begin_is_an_error() -> None:
    rec = Recorder(RecorderConfig())
    with pytest.raises(ValueError, match="begin_step"):
        rec.end_step()


def test_bad_config_names_the_value() -> None:
    with pytest.raises(ValueError, match="window_steps must be >= 1, got 0"):
        RecorderConfig(window_steps=0)


def test_unexported_recorder_stays_bounded_and_counts_drops() -> None:
    """10 minutes of 100 ms steps (6,000 steps) with nobody exporting: memory stays bounded."""
    capacity = 4096
    rec = Recorder(RecorderConfig(capacity=capacity, system_metrics=False))
    steps, sections, counters = 6000, 20, 10
    tracemalloc.start()
    for step in range(steps):
        rec.begin_step(step)
        for s in range(sections):
            with rec.section(f"s{s}"):
                pass
        for c in range(counters):
            rec.counter(f"c{c}")
        rec.end_step()
        if step == 600:
            early, _ = tracemalloc.get_traced_memory()
    late, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    total = steps * (sections + counters + 1)
    stats = rec.stats()
    assert stats["buffered"] == capacity
    assert stats["dropped"] == total - capacity
    assert late - early < 64 * 1024, f"memory grew by {late - early} bytes after the buffer filled"
    assert peak < 8 * 1024 * 1024


def _child_exports(rec: Recorder, sink: ListSink) -> None:
    _steps(rec, 4)
    deadline = time.monotonic() + 5
    while len(sink.windows) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    raise SystemExit(0 if len(sink.windows) == 2 else 1)


def test_a_forked_child_gets_its_own_exporter_thread() -> None:
    import multiprocessing

    sink = ListSink()
    rec = Recorder(RecorderConfig(window_steps=2, flush_interval_s=0.05), [sink])
    _steps(rec, 2)  # the parent's exporter thread is running before the fork
    child = multiprocessing.get_context("fork").Process(target=_child_exports, args=(rec, sink))
    child.start()
    child.join(timeout=20)
    assert child.exitcode == 0, "the child's windows were never exported"
    rec.close()
