"""OpenTelemetry export: window aggregates as metrics, through a MeterProvider.

Nothing here is configured at import time. :func:`make_meter_provider` builds a provider
(with a Prometheus scrape endpoint, OTLP, or any reader a test passes, such as the SDK's
``InMemoryMetricReader``); call it *inside* each worker process, after fork, because an SDK
provider's export threads do not survive ``fork``. Without a provider, :class:`OTelSink` uses
the global one, which is OpenTelemetry's no-op until someone configures it.

Cardinality: metric attributes are only the section (or counter/gauge) name and the
statistic; the run, rank and node go into the *resource* (one provider per process), and
per-step, per-rank detail goes to the Parquet store. The Prometheus endpoint copies those
three resource attributes onto every series as ``step_infra_run``, ``step_infra_node`` and
``step_infra_rank`` labels, so PromQL can group by node without a ``target_info`` join:
bounded by the job size, never by the step. The controller's
:class:`StragglerScores` adds ``rank`` and ``node`` labels (one series per live rank, gone
when the rank is). A view caps every instrument at ``cardinality_limit`` series as a second
guard. The Grafana dashboard and Prometheus alert rules shipped in
``step_infra/telemetry/grafana/`` query exactly these names (a test checks them against a
scrape).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import View
from opentelemetry.sdk.resources import Resource

from step_infra.telemetry.window import Window

log = logging.getLogger(__name__)

METER_NAME = "step_infra.telemetry"
# Resource attributes copied onto every Prometheus series (bounded by the job size).
LABEL_ATTRIBUTES = ("step_infra.run", "step_infra.node", "step_infra.rank")
# Step-time histogram buckets, seconds: a DiT step takes 0.1 s (tiny tests) to minutes; the
# SDK's default buckets (0, 5, 10, 25, ... 10000) would put every test step in the first.
STEP_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class OTelConfig:
    """Which exporters a worker's MeterProvider gets."""

    prometheus_port: int | None = None  # serve /metrics on 127.0.0.1:port (0 = free port)
    prometheus_addr: str = "127.0.0.1"
    otlp_endpoint: str | None = None  # e.g. "http://collector:4317"; needs the [otlp] extra
    otlp_interval_s: float = 10.0
    cardinality_limit: int = 512


@dataclass(slots=True)
class TelemetryProvider:
    """A configured provider and the servers it owns; :meth:`shutdown` stops them all."""

    provider: MeterProvider
    prometheus_port: int | None = None
    _http_server: Any = None

    def shutdown(self) -> None:
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
        self.provider.shutdown()


def make_meter_provider(
    config: OTelConfig,
    *,
    rank: int,
    node: str,
    run: str,
    extra_readers: Sequence[MetricReader] = (),
) -> TelemetryProvider:
    """Build a MeterProvider for this rank; call it after the worker process has forked."""
    if config.cardinality_limit < 1:
        raise ValueError(f"cardinality_limit must be >= 1, got {config.cardinality_limit}")
    readers: list[MetricReader] = list(extra_readers)
    http_server = None
    port = None
    if config.prometheus_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()  # per provider: no global registry state
        readers.append(
            PrometheusMetricReader(
                registry=registry,
                scope_info_enabled=False,  # one meter: otel_scope_* labels say nothing
                resource_attribute_filter=LABEL_ATTRIBUTES.__contains__,
            )
        )
        http_server, _thread = start_http_server(
            config.prometheus_port, addr=config.prometheus_addr, registry=registry
        )
        port = int(http_server.server_port)
    if config.otlp_endpoint is not None:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter,
            )
        except ImportError as exc:
            raise ValueError(
                f"otlp_endpoint={config.otlp_endpoint!r} needs the OTLP exporter: "
                "pip install 'step-infra[otlp]'"
            ) from exc
        readers.append(
            PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=config.otlp_endpoint),
                export_interval_millis=config.otlp_interval_s * 1000,
            )
        )
    resource = Resource.create(
        {
            "service.name": "step-infra",
            "service.instance.id": f"{run}/rank{rank}",
            "step_infra.run": run,
            "step_infra.rank": rank,
            "step_infra.node": node,
        }
    )
    provider = MeterProvider(
        resource=resource,
        metric_readers=readers,
        views=[View(instrument_name="*", aggregation_cardinality_limit=config.cardinality_limit)],
    )
    return TelemetryProvider(provider=provider, prometheus_port=port, _http_server=http_server)


class OTelSink:
    """A :class:`~step_infra.telemetry.sink.MetricsSink` recording window aggregates."""

    def __init__(self, provider: metrics.MeterProvider | None = None) -> None:
        meter = (provider or metrics.get_meter_provider()).get_meter(METER_NAME)
        self._section = meter.create_gauge(
            "step_infra_section_seconds", unit="s", description="section duration per window"
        )
        self._arrival = meter.create_gauge(
            "step_infra_collective_wait_seconds",
            unit="s",
            description="time waited inside a collective after arriving, per window",
        )
        self._step = meter.create_histogram(
            "step_infra_step_seconds",
            unit="s",
            description="step wall time",
            explicit_bucket_boundaries_advisory=STEP_BUCKETS_S,
        )
        self._stall = meter.create_gauge(
            "step_infra_data_stall_ratio",
            description="fraction of the window's step time spent waiting for data",
        )
        self._counter = meter.create_counter(
            "step_infra_events", description="counters summed per window"
        )
        self._gauge = meter.create_gauge("step_infra_value", description="last gauge value")
        self._dropped = meter.create_gauge(
            "step_infra_dropped_records", description="records dropped by the ring buffer"
        )

    def write_window(self, window: Window) -> None:
        for name, stats in window.sections.items():
            for stat in ("p50", "p90", "max"):
                self._section.set(getattr(stats, stat), {"section": name, "stat": stat})
        for name, stats in window.arrivals.items():
            for stat in ("p50", "p90", "max"):
                self._arrival.set(getattr(stats, stat), {"collective": name, "stat": stat})
        for seconds in window.step_times:
            self._step.record(seconds)
        stall = data_stall_ratio(window)
        if stall is not None:
            self._stall.set(stall)
        for name, total in window.counters.items():
            if total >= 0:
                self._counter.add(total, {"name": name})
        for name, value in window.gauges.items():
            self._gauge.set(value, {"name": name})
        self._dropped.set(window.dropped)

    def close(self) -> None:
        """The provider is owned by whoever made it (see :class:`TelemetryProvider`)."""


def data_stall_ratio(window: Window) -> float | None:
    """Seconds waited for data (the ``data_wait_s`` gauge of every step) over the window's
    step time; None when the window recorded no data wait or no step time."""
    detail = window.detail
    waited = [
        v
        for k, n, v in zip(
            detail.get("kind", ()), detail.get("name", ()), detail.get("value", ()), strict=True
        )
        if k == "gauge" and n == "data_wait_s"
    ]
    total = sum(window.step_times)
    if not waited or total <= 0:
        return None
    return min(1.0, sum(waited) / total)


class StragglerScores:
    """``step_infra_straggler_score{rank, node}``: the detector's latest robust z per rank,
    exported from the controller (the one process that sees every rank).

    An observable gauge over a snapshot that :meth:`update` replaces: a rank missing from the
    latest snapshot (evicted, or its node gone) has no series any more, instead of its last
    score lingering and keeping an alert firing. Series: one per live rank (bounded by the job
    size); give the controller's provider ``OTelConfig(cardinality_limit=world_size + 1)``
    or more.
    """

    def __init__(self, provider: metrics.MeterProvider | None = None) -> None:
        meter = (provider or metrics.get_meter_provider()).get_meter(METER_NAME)
        self._lock = threading.Lock()
        self._points: list[tuple[float, dict[str, str]]] = []
        meter.create_observable_gauge(
            "step_infra_straggler_score",
            callbacks=[self._observe],
            description="robust z of each rank's compute time vs its peers (latest window); "
            "the detector convicts at its threshold, persistently",
        )

    def update(self, scores: Mapping[str, float], nodes: Mapping[str, str]) -> None:
        """Replace the exported scores: ``scores`` by rank (as the detector names members),
        ``nodes`` the node of each rank. Non-finite scores are left out."""
        points = [
            (float(z), {"rank": str(rank), "node": str(nodes.get(rank, ""))})
            for rank, z in scores.items()
            if math.isfinite(z)
        ]
        with self._lock:
            self._points = points

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            points = list(self._points)
        return [Observation(z, attrs) for z, attrs in points]
