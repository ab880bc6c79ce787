"""The per-rank ``Recorder``: timed sections, counters, gauges, collective arrivals.

The training thread only appends small tuples to a bounded :class:`RingBuffer` (no lock, no
I/O, never blocks; a full buffer drops and counts). A daemon thread drains the buffer, cuts
it into windows of ``window_steps`` completed steps, aggregates each (p50/p90/max per
section, see :mod:`~step_infra.telemetry.window`) and hands it to the sinks. Without sinks
the recorder is a cheap no-op apart from its buffer.

Who is slow: a section that ends in an all-reduce lasts as long on every rank, so time the
*compute-only* part with :meth:`Recorder.section` and wrap each collective in
:meth:`Recorder.collective`, which stamps the arrival time before the collective starts and
the time waited inside it. The slow rank arrives last and waits least.

Data-wait, loss, tokens and FLOPs are passed in by the caller at :meth:`Recorder.end_step`
(from StepRPC and the emulator), so this package imports neither.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from step_infra.telemetry.cuda_timing import CudaTimer
from step_infra.telemetry.ring import RingBuffer
from step_infra.telemetry.sink import MetricsSink
from step_infra.telemetry.system import SystemSampler
from step_infra.telemetry.window import Kind, Record, Window, build_window

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class RecorderConfig:
    """One rank's recorder settings."""

    rank: int = 0
    node: str = ""
    attempt: int = 0  # TorchElastic restart count, so rows of a re-run step stay apart
    capacity: int = 65_536  # records held between exports; beyond that they drop
    window_steps: int = 10  # completed steps per exported window
    flush_interval_s: float = 0.5  # how often the exporter thread wakes up
    max_names: int = 256  # distinct section/counter/gauge names; more fold into "other"
    cuda_events: bool | None = None  # None: use CUDA events when torch has CUDA
    peak_flops_per_s: float | None = None  # per rank, for MFU
    system_metrics: bool = True

    def __post_init__(self) -> None:
        for name in ("capacity", "window_steps", "max_names"):
            if getattr(self, name) < 1:
                raise ValueError(f"RecorderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.flush_interval_s <= 0:
            raise ValueError(f"flush_interval_s must be > 0, got {self.flush_interval_s}")


class _Section:
    __slots__ = ("_cuda_start", "_name", "_rec", "_t0")

    def __init__(self, rec: Recorder, name: str) -> None:
        self._rec = rec
        self._name = name

    def __enter__(self) -> None:
        rec = self._rec
        if rec._cuda is not None:
            self._cuda_start = rec._cuda.start()
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        rec = self._rec
        if rec._cuda is not None:
            rec._cuda.stop(self._name, rec._step, self._cuda_start)
            return
        rec._buf.append(
            (Kind.SECTION, self._name, rec._step, time.perf_counter() - self._t0, time.time_ns())
        )


class _Collective:
    __slots__ = ("_name", "_rec", "_t0")

    def __init__(self, rec: Recorder, name: str) -> None:
        self._rec = rec
        self._name = name

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()
        self._rec._arrived = time.time_ns()

    def __exit__(self, *exc: object) -> None:
        rec = self._rec
        rec._buf.append(
            (Kind.ARRIVAL, self._name, rec._step, time.perf_counter() - self._t0, rec._arrived)
        )


class Recorder:
    """Per-rank telemetry recorder; use as a context manager or call :meth:`close`."""

    def __init__(self, config: RecorderConfig, sinks: Sequence[MetricsSink] = ()) -> None:
        self.config = config
        self._sinks = list(sinks)
        self._buf: RingBuffer[Record] = RingBuffer(config.capacity)
        self._step = 0
        self._step_t0: float | None = None
        self._arrived = 0
        self._names: set[str] = set()
        self.names_folded = 0
        self._cuda: CudaTimer | None = None
        torch = sys.modules.get("torch")
        use_cuda = config.cuda_events
        if use_cuda is None:
            use_cuda = torch is not None and torch.cuda.is_available()
        if use_cuda:
            if torch is None:
                raise ValueError("cuda_events=True needs torch imported by the trainer first")
            self._cuda = CudaTimer(torch, max_pending=config.capacity)
        # Exporter-side state (touched only by the exporter thread, or under _export_lock).
        self._pending: list[Record] = []
        self._export_lock = threading.Lock()
        self._sampler = SystemSampler() if config.system_metrics else None
        self.windows_exported = 0
        self.export_cpu_s = 0.0  # CPU time the exporter side spent (aggregation + sinks)
        self.export_errors = 0
        self.pending_dropped = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._pid = os.getpid()

    # ----------------------------------------------------------------- hot path
    @property
    def step(self) -> int:
        return self._step

    @property
    def dropped(self) -> int:
        """Records lost so far: ring buffer full, CUDA pairs over the bound, backlog trims."""
        cuda = self._cuda.dropped if self._cuda is not None else 0
        return self._buf.dropped + cuda + self.pending_dropped

    def _name(self, name: str) -> str:
        if name in self._names:
            return name
        if len(self._names) >= self.config.max_names:
            self.names_folded += 1
            return "other"
        self._names.add(name)
        return name

    def begin_step(self, step: int) -> None:
        """Mark the start of ``step``; its wall time runs until :meth:`end_step`."""
        self._step = step
        self._step_t0 = time.perf_counter()

    def end_step(
        self,
        *,
        loss: float | None = None,
        tokens: float | None = None,
        flops: float | None = None,
        data_wait_s: float | None = None,
        step_time_s: float | None = None,
    ) -> float:
        """Close the step; record step time and the default per-step metrics. Returns seconds.

        ``data_wait_s`` comes from the data pipe (StepRPC), ``flops`` from the emulator's count
        for this step on this rank; MFU needs ``RecorderConfig.peak_flops_per_s``;
        ``tokens`` are this rank's tokens (the dashboard sums ranks). ``step_time_s``
        overrides the measured wall time (for steps timed elsewhere, or simulated).
        """
        if self._step_t0 is None:
            raise ValueError("end_step() called before begin_step(step)")
        seconds = time.perf_counter() - self._step_t0 if step_time_s is None else step_time_s
        self._step_t0 = None
        now = time.time_ns()
        step = self._step
        append = self._buf.append
        if loss is not None:
            append((Kind.GAUGE, "loss", step, float(loss), now))
        if data_wait_s is not None:
            append((Kind.GAUGE, "data_wait_s", step, float(data_wait_s), now))
        if tokens is not None and seconds > 0:
            append((Kind.GAUGE, "tokens_per_s", step, tokens / seconds, now))
        peak = self.config.peak_flops_per_s
        if flops is not None and peak and seconds > 0:
            append((Kind.GAUGE, "mfu", step, flops / (seconds * peak), now))
        append((Kind.STEP, "step", step, seconds, now))
        self._ensure_thread()
        return seconds

    def section(self, name: str) -> _Section:
        """``with rec.section("fwd"):`` times a compute-only section of the current step."""
        return _Section(self, self._name(name))

    def collective(self, name: str) -> _Collective:
        """``with rec.collective("grad_allreduce"): dist.all_reduce(t)``: arrival + wait."""
        return _Collective(self, self._name(name))

    def record_arrival(self, name: str, *, arrived_unix_s: float, wait_s: float) -> None:
        """Record a collective timed elsewhere: arrival time (wall clock) and time waited."""
        self._buf.append(
            (Kind.ARRIVAL, self._name(name), self._step, float(wait_s), int(arrived_unix_s * 1e9))
        )

    def record_section(self, name: str, seconds: float) -> None:
        """Record a section timed elsewhere (another timer, a profiler, a simulation)."""
        self._buf.append(
            (Kind.SECTION, self._name(name), self._step, float(seconds), time.time_ns())
        )

    def counter(self, name: str, value: float = 1.0) -> None:
        self._buf.append((Kind.COUNTER, self._name(name), self._step, float(value), time.time_ns()))

    def gauge(self, name: str, value: float) -> None:
        self._buf.append((Kind.GAUGE, self._name(name), self._step, float(value), time.time_ns()))

    # ------------------------------------------------------------ exporter side
    def _ensure_thread(self) -> None:
        if not self._sinks:
            return
        if self._thread is None or self._pid != os.getpid():
            if self._pid != os.getpid():
                # A forked child: the parent's thread did not survive the fork and its lock
                # may have been held at that instant; start afresh.
                self._pid = os.getpid()
                self._export_lock = threading.Lock()
                self._stop = threading.Event()
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name=f"telemetry-export-r{self.config.rank}", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.config.flush_interval_s):
            self._export(final=False)

    def _collect(self) -> None:
        if self._cuda is not None:
            self._pending.extend(self._cuda.poll())
        self._pending.extend(self._buf.drain())
        overflow = len(self._pending) - 2 * self.config.capacity
        if overflow > 0:  # nobody completes steps: keep memory bounded, count the trim
            del self._pending[:overflow]
            self.pending_dropped += overflow

    def _export(self, *, final: bool) -> int:
        """Export every complete window (all pending records when ``final``); return count."""
        with self._export_lock:
            cpu0 = time.thread_time()
            try:
                return self._export_locked(final=final)
            finally:
                self.export_cpu_s += time.thread_time() - cpu0

    def _export_locked(self, *, final: bool) -> int:
        self._collect()
        windows = self._cut_windows(final=final)
        for window in windows:
            for sink in self._sinks:
                try:
                    sink.write_window(window)
                except Exception:
                    self.export_errors += 1
                    log.exception("telemetry sink %r failed; window dropped", sink)
            self.windows_exported += 1
        return len(windows)

    def _cut_windows(self, *, final: bool) -> list[Window]:
        pending = self._pending
        done_steps = sorted({r[2] for r in pending if r[0] == Kind.STEP})
        if self._cuda is not None and not final:
            oldest = self._cuda.oldest_pending_step()
            if oldest is not None:
                done_steps = [s for s in done_steps if s < oldest]
        size = self.config.window_steps
        groups = [done_steps[i : i + size] for i in range(0, len(done_steps), size)]
        if not final and groups and len(groups[-1]) < size:
            groups.pop()
        windows = []
        for group in groups:
            last = group[-1]
            chunk = [r for r in pending if r[2] <= last]
            pending = [r for r in pending if r[2] > last]
            windows.append(self._window(chunk))
        if final and pending:
            windows.append(self._window(pending))
            pending = []
        self._pending = pending
        return windows

    def _window(self, records: list[Record]) -> Window:
        extra = self._sampler.sample() if self._sampler is not None else None
        if extra is not None:
            extra["dropped_records"] = float(self.dropped)
        return build_window(
            records,
            rank=self.config.rank,
            node=self.config.node,
            attempt=self.config.attempt,
            dropped=self.dropped,
            extra_gauges=extra,
        )

    def flush(self) -> int:
        """Export every pending record now, complete window or not; return windows written."""
        return self._export(final=True)

    def close(self) -> None:
        """Stop the exporter thread, flush what is left and close the sinks."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None
        self.flush()
        for sink in self._sinks:
            try:
                sink.close()
            except Exception:
                log.exception("telemetry sink %r failed to close", sink)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        """Counters a caller can log: appended, dropped, windows, export errors, buffered."""
        return {
            "appended": self._buf.appended,
            "dropped": self.dropped,
            "buffered": len(self._buf) + len(self._pending),
            "windows_exported": self.windows_exported,
            "export_errors": self.export_errors,
            "export_cpu_s": round(self.export_cpu_s, 6),
            "names_folded": self.names_folded,
        }
