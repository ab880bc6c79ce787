"""StepTelemetry: per-rank telemetry, straggler detection, eviction and a dashboard.

Recording (:class:`Recorder`) is cheap and never blocks the step; export goes to the local
Parquet store (:class:`ParquetStore`) and OpenTelemetry (:class:`OTelSink`); the
:class:`StragglerDetector` reads aggregated windows; an :class:`EvictionPolicy` decides and
the elastic controller (:mod:`step_infra.telemetry.elastic`) acts through TorchElastic.
Importing this package configures nothing and starts nothing.
"""

from __future__ import annotations

from step_infra.telemetry.detector import Detection, DetectorConfig, StragglerDetector
from step_infra.telemetry.events import EventLog, read_events
from step_infra.telemetry.otel import OTelConfig, OTelSink, make_meter_provider
from step_infra.telemetry.policy import DetectOnly, Evict, EvictionPolicy, make_policy
from step_infra.telemetry.recorder import Recorder, RecorderConfig
from step_infra.telemetry.sink import MetricsSink
from step_infra.telemetry.store import ParquetStore, StoreTail, read_store
from step_infra.telemetry.window import Kind, Stats, Window

__all__ = [
    "DetectOnly",
    "Detection",
    "DetectorConfig",
    "EventLog",
    "Evict",
    "EvictionPolicy",
    "Kind",
    "MetricsSink",
    "OTelConfig",
    "OTelSink",
    "ParquetStore",
    "Recorder",
    "RecorderConfig",
    "Stats",
    "StoreTail",
    "StragglerDetector",
    "Window",
    "make_meter_provider",
    "make_policy",
    "read_events",
    "read_store",
]
