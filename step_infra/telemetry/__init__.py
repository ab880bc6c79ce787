"""StepTelemetry: per-rank telemetry, straggler detection, eviction and a dashboard.

Recording (:class:`Recorder`) is cheap and never blocks the step; export goes to the local
Parquet store (:class:`ParquetStore`) and OpenTelemetry (:class:`OTelSink`); the
:class:`StragglerDetector` reads aggregated windows; an :class:`EvictionPolicy` decides and
the elastic controller (:mod:`step_infra.telemetry.elastic`) acts through TorchElastic.

Importing this package configures nothing, starts nothing and imports nothing heavy: the
names below load their module on first use (PEP 562), so ``step-infra --help`` can import
``step_infra.telemetry.cli`` without pulling in pandas, pyarrow or OpenTelemetry.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
    "DetectOnly": "policy",
    "Evict": "policy",
    "EvictionPolicy": "policy",
    "make_policy": "policy",
    "Recorder": "recorder",
    "RecorderConfig": "recorder",
    "MetricsSink": "sink",
    "ParquetStore": "store",
    "StoreTail": "store",
    "read_store": "store",
    "Kind": "window",
    "Stats": "window",
    "Window": "window",
    "ElasticConfig": "elastic",
    "ElasticResult": "elastic",
    "run_elastic_job": "elastic",
}

__all__ = [
    "DetectOnly",
    "Detection",
    "DetectorConfig",
    "ElasticConfig",
    "ElasticResult",
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
    "StragglerScores",
    "Window",
    "make_meter_provider",
    "make_policy",
    "read_events",
    "read_store",
    "run_elastic_job",
]
assert set(__all__) == set(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'step_infra.telemetry' has no attribute {name!r}")
    return getattr(importlib.import_module(f"step_infra.telemetry.{module}"), name)


if TYPE_CHECKING:
    from step_infra.telemetry.detector import Detection, DetectorConfig, StragglerDetector
    from step_infra.telemetry.elastic import ElasticConfig, ElasticResult, run_elastic_job
    from step_infra.telemetry.events import EventLog, read_events
    from step_infra.telemetry.otel import (
        OTelConfig,
        OTelSink,
        StragglerScores,
        make_meter_provider,
    )
    from step_infra.telemetry.policy import DetectOnly, Evict, EvictionPolicy, make_policy
    from step_infra.telemetry.recorder import Recorder, RecorderConfig
    from step_infra.telemetry.sink import MetricsSink
    from step_infra.telemetry.store import ParquetStore, StoreTail, read_store
    from step_infra.telemetry.window import Kind, Stats, Window
