"""StepTelemetry: per-rank telemetry, straggler detection and a dashboard (observability only).

Recording (:class:`Recorder`) is cheap and never blocks the step; export goes to the local
Parquet store (:class:`ParquetStore`) and OpenTelemetry (:class:`OTelSink`); the
:class:`StragglerDetector` reads aggregated windows. Acting on what it finds (eviction, hot
spares, restarts) is :mod:`step_infra.elastic`'s job: it imports this package, never the
reverse.

Importing this package configures nothing, starts nothing and imports nothing heavy: the
names below load their module on first use (PEP 562), so ``step-infra --help`` can import
``step_infra.telemetry.cli`` without pulling in pandas, pyarrow or OpenTelemetry.
"""

from __future__ import annotations

from typing import Any

from step_infra.lazy import lazy_attribute

_EXPORTS = {
    "Detection": "detector",
    "DetectorConfig": "detector",
    "StragglerDetector": "detector",
    "EventLog": "events",
    "read_events": "events",
    "OTelConfig": "otel",
    "OTelSink": "otel",
    "StragglerScores": "otel",
    "make_meter_provider": "otel",
    "Recorder": "recorder",
    "RecorderConfig": "recorder",
    "MetricsSink": "sink",
    "ParquetStore": "store",
    "StoreTail": "store",
    "read_store": "store",
    "Kind": "window",
    "Stats": "window",
    "Window": "window",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _EXPORTS, name)
