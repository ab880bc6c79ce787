"""Parquet store and OpenTelemetry export (in-memory reader, Prometheus scrape)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from step_infra.telemetry import (
    OTelConfig,
    OTelSink,
    ParquetStore,
    Recorder,
    RecorderConfig,
    StoreTail,
    make_meter_provider,
    read_store,
)


def _run(rec: Recorder, steps: int) -> None:
    for step in range(steps):
        rec.begin_step(step)
        with rec.section("fwd"):
            pass
        with rec.section("bwd"):
            pass
        rec.counter("samples", 2)
        rec.end_step(loss=0.5)


def test_store_appends_one_part_per_window_and_reads_back(tmp_path: Path) -> None:
    tail = StoreTail(tmp_path)
    assert tail.poll().empty
    for rank in range(2):
        cfg = RecorderConfig(rank=rank, node=f"n{rank}", window_steps=4)
        with Recorder(cfg, [ParquetStore(tmp_path)]) as rec:
            _run(rec, 8)
    parts = sorted((tmp_path / "telemetry.parquet").glob("*.parquet"))
    assert len(parts) == 4  # 2 ranks x 2 windows
    df = read_store(tmp_path)
    assert set(df["rank"]) == {0, 1} and set(df["node"]) == {"n0", "n1"}
    steps = df[df["kind"] == "step"]
    assert len(steps) == 16 and set(steps["step"]) == set(range(8))
    assert (df[df["name"] == "loss"]["value"] == 0.5).all()
    assert len(tail.poll()) == len(df)
    assert tail.poll().empty  # nothing new


def test_otel_in_memory_reader_sees_window_aggregates() -> None:
    reader = InMemoryMetricReader()
    tp = make_meter_provider(OTelConfig(), rank=1, node="n1", run="t", extra_readers=[reader])
    with Recorder(RecorderConfig(rank=1, window_steps=5), [OTelSink(tp.provider)]) as rec:
        _run(rec, 10)
    data = reader.get_metrics_data()
    metrics = {
        m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }
    assert data.resource_metrics[0].resource.attributes["step_infra.rank"] == 1
    section = metrics["step_infra_section_seconds"]
    attrs = {tuple(sorted(p.attributes.items())) for p in section.data.data_points}
    assert (("section", "fwd"), ("stat", "p90")) in attrs
    # Cardinality: rank is a resource attribute, never a metric attribute.
    assert all("rank" not in dict(a) for a in attrs)
    steps = metrics["step_infra_step_seconds"].data.data_points[0]
    assert steps.count == 10
    samples = metrics["step_infra_events"].data.data_points[0]
    assert samples.value == 20
    tp.shutdown()


def test_prometheus_endpoint_serves_metrics() -> None:
    tp = make_meter_provider(OTelConfig(prometheus_port=0), rank=0, node="n0", run="t")
    try:
        assert tp.prometheus_port
        with Recorder(RecorderConfig(window_steps=2), [OTelSink(tp.provider)]) as rec:
            _run(rec, 4)
        url = f"http://127.0.0.1:{tp.prometheus_port}/metrics"
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        assert "step_infra_section_seconds" in body
        assert 'section="bwd"' in body
    finally:
        tp.shutdown()


def test_otlp_without_package_says_how_to_install() -> None:
    """Only meaningful where the [otlp] extra is absent; skips otherwise."""
    try:
        import opentelemetry.exporter.otlp.proto.grpc  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"step-infra\[otlp\]"):
            make_meter_provider(
                OTelConfig(otlp_endpoint="http://127.0.0.1:1"), rank=0, node="", run="t"
            )
    else:
        pytest.skip("OTLP exporter installed: the missing-package message cannot be shown")


def test_without_provider_otel_sink_is_a_no_op() -> None:
    with Recorder(RecorderConfig(window_steps=2), [OTelSink()]) as rec:
        _run(rec, 4)
    assert rec.windows_exported == 2 and rec.export_errors == 0


@pytest.mark.integration
def test_otlp_exporter_sends_window_aggregates_to_a_collector() -> None:
    """A minimal in-process OTLP/gRPC collector receives the metrics (needs the [otlp] extra)."""
    pytest.importorskip(
        "opentelemetry.exporter.otlp.proto.grpc",
        reason="OTLP exporter not installed: pip install 'step-infra[otlp]'",
    )
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.metrics.v1 import (
        metrics_service_pb2,
        metrics_service_pb2_grpc,
    )

    received: list[str] = []

    class Collector(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(self, request, context):  # type: ignore[no-untyped-def]
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    received.extend(m.name for m in sm.metrics)
            return metrics_service_pb2.ExportMetricsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        tp = make_meter_provider(
            OTelConfig(otlp_endpoint=f"http://127.0.0.1:{port}", otlp_interval_s=60.0),
            rank=0,
            node="n0",
            run="t",
        )
        with Recorder(RecorderConfig(window_steps=2), [OTelSink(tp.provider)]) as rec:
            _run(rec, 4)
        tp.shutdown()  # flushes the periodic reader: one export to the collector
    finally:
        server.stop(grace=None)
    assert "step_infra_section_seconds" in received
    assert "step_infra_step_seconds" in received
