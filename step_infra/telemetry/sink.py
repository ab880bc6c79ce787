"""The ``MetricsSink`` extension point: where a finished window goes.

Two real implementations exist: the local Parquet store (per-rank, per-step detail; needs no
server) and the OpenTelemetry sink (window aggregates as metrics, exported by Prometheus or
OTLP). Sinks run on the recorder's background thread only, so they may do I/O.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from step_infra.telemetry.window import Window


@runtime_checkable
class MetricsSink(Protocol):
    """Receives each aggregated window on the exporter thread."""

    def write_window(self, window: Window) -> None:
        """Export one window; may block (it runs off the training thread)."""
        ...

    def close(self) -> None:
        """Flush and release resources; called once when the recorder closes."""
        ...
