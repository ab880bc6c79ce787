"""The shipped Grafana dashboard and Prometheus alert rules, against what the job exports.

A real Prometheus (Debian package ``prometheus``) scrapes the OpenTelemetry Prometheus
endpoints of running Recorders (8 ranks on 2 nodes, one rank 30 % slower) and the
controller's straggler scores (a real :class:`StragglerDetector` fed the ranks' compute
times), loads ``alerts.yml``, and must show: every series with bounded labels (no step in any
label), every alert rule healthy, the straggler alert pending for the slow rank, and every
Grafana panel's query answered with data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from step_infra.telemetry import StragglerDetector
from step_infra.telemetry.grafana import ALERTS, ALERTS_TEST, DASHBOARD, asset
from step_infra.telemetry.otel import (
    OTelConfig,
    OTelSink,
    StragglerScores,
    TelemetryProvider,
    make_meter_provider,
)
from step_infra.telemetry.recorder import Recorder, RecorderConfig

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
NEEDS_PROMETHEUS = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="needs Prometheus and promtool (Debian): apt-get update && apt-get install -y prometheus",
)
RUN = "grafana-test"
NODES, RANKS_PER_NODE, SLOW_RANK = 2, 4, 3
# Labels a step-infra series may carry: identity bounded by the job size, the section /
# collective / gauge name, the statistic, histogram buckets, and the scrape target.
ALLOWED_LABELS = {
    "__name__", "job", "instance", "step_infra_run", "step_infra_node", "step_infra_rank",
    "section", "collective", "name", "stat", "le", "rank", "node",
}  # fmt: skip
PROMQL_WORDS = {
    "sum", "avg", "max", "min", "count", "topk", "bottomk", "by", "without", "on", "ignoring",
    "group_left", "group_right", "rate", "irate", "increase", "delta", "histogram_quantile",
    "offset", "and", "or", "unless", "label_values",
}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(what: str, check: Callable[[], Any], timeout_s: float) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:  # not up yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


def panel_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel."""
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads: identifiers outside label matchers, grouping
    clauses and strings, that are neither functions nor keywords."""
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b\d+(\.\d+)?(ms|s|m|h|d|w|y)?\b", "", expr)  # numbers, durations
    return set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr)) - PROMQL_WORDS


def exported_names(metrics_text: str) -> set[str]:
    """Every sample name a /metrics page serves (histograms as _bucket, _sum, _count)."""
    return {s.name for fam in text_string_to_metric_families(metrics_text) for s in fam.samples}


class _Job:
    """Recorders of 8 ranks stepping on a thread (fabricated durations, rank 3 slower), each
    with its own provider and /metrics endpoint, plus the controller's: a straggler detector
    fed every step and exporting its scores."""

    def __init__(self) -> None:
        self.ranks = NODES * RANKS_PER_NODE
        self.node_of = {str(r): f"node{r // RANKS_PER_NODE}" for r in range(self.ranks)}
        self.providers: list[TelemetryProvider] = []
        self.recorders: list[Recorder] = []
        for rank in range(self.ranks):
            tp = make_meter_provider(
                OTelConfig(prometheus_port=0), rank=rank, node=self.node_of[str(rank)], run=RUN
            )
            cfg = RecorderConfig(
                rank=rank,
                node=self.node_of[str(rank)],
                window_steps=5,
                peak_flops_per_s=1e12,
                system_metrics=False,
            )
            self.providers.append(tp)
            self.recorders.append(Recorder(cfg, [OTelSink(tp.provider)]))
        self.controller = make_meter_provider(
            OTelConfig(prometheus_port=0, cardinality_limit=self.ranks + 1),
            rank=-1,
            node="controller",
            run=RUN,
        )
        self.providers.append(self.controller)
        self.scores = StragglerScores(self.controller.provider)
        self.detector = StragglerDetector(nodes=self.node_of)
        self.steps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def ports(self) -> list[int]:
        return [int(tp.prometheus_port or 0) for tp in self.providers]

    def _step(self, rng: np.random.Generator) -> None:
        step = self.steps
        computes = {}
        for rank, rec in enumerate(self.recorders):
            compute = 0.1 * float(np.exp(rng.normal(0, 0.03))) * (1.3 if rank == SLOW_RANK else 1)
            computes[str(rank)] = compute
            rec.begin_step(step)
            rec.record_section("data_wait_s", 0.01)
            rec.record_section("compute", compute)
            rec.record_arrival("grad_allreduce", arrived_unix_s=time.time(), wait_s=0.13 - compute)
            rec.counter("samples", 4)
            rec.end_step(loss=1.0 / (1 + step), tokens=4096.0, flops=4e10, data_wait_s=0.01,
                         step_time_s=0.145)  # fmt: skip
        self.detector.observe(step, computes)
        self.scores.update(self.detector.latest_scores(), self.node_of)
        self.steps += 1

    def _run(self) -> None:
        rng = np.random.default_rng(0)
        while not self._stop.is_set():
            self._step(rng)
            time.sleep(0.02)

    def __enter__(self) -> _Job:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for rec in self.recorders:
            rec.close()
        for tp in self.providers:
            tp.shutdown()


@contextmanager
def _prometheus(tmp: Path, targets: list[int], rules: Path) -> Iterator[str]:
    """A Prometheus on 127.0.0.1 scraping ``targets`` every second with ``rules`` loaded;
    yields its base URL and stops it by its pid (SIGTERM, then SIGKILL)."""
    port = _free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": [
                    {
                        "job_name": "step-infra",
                        "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in targets]}],
                    }
                ],
            }
        )
    )
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            str(PROMETHEUS),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(
                    f"prometheus exited {proc.returncode}: {(tmp / 'prometheus.log').read_text()}"
                )
            with urllib.request.urlopen(url + "/-/ready", timeout=2) as resp:
                return resp.status == 200

        _wait_for("prometheus to be ready", ready, 60)
        yield url
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        log.close()


def _api(url: str, path: str, **params: str) -> Any:
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}/api/v1/{path}?{query}", timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    return _api(url, "query", query=expr)["result"]


@pytest.mark.integration
@pytest.mark.timeout(60)
@NEEDS_PROMETHEUS
def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    folder = Path(str(asset(ALERTS))).parent
    for args in (["check", "rules", ALERTS], ["test", "rules", ALERTS_TEST]):
        out = subprocess.run(
            [str(PROMTOOL), *args], cwd=folder, capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.timeout(60)
def test_grafana_panels_query_only_metrics_the_endpoint_serves() -> None:
    """Structural check without Prometheus: every panel has a PromQL target whose metric
    names appear on a live /metrics page of a Recorder and of the controller."""
    dashboard = json.loads(asset(DASHBOARD).read_text())
    assert dashboard["uid"] and dashboard["panels"]
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "run", "node"}
    with _Job() as job:
        _wait_for("a few steps", lambda: job.steps > 20, 30)
        time.sleep(0.2)  # the exporter threads cut their windows
        text = ""
        for port in job.ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                text += resp.read().decode()
    served = exported_names(text)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    for title, expr in panel_exprs(dashboard):
        names = metric_names(expr)
        assert names and names <= served, (title, names - served)
    yaml = pytest.importorskip("yaml", reason="PyYAML reads the alert rules")
    groups = yaml.safe_load(asset(ALERTS).read_text())["groups"]
    exprs = [rule["expr"] for group in groups for rule in group["rules"]]
    assert len(exprs) == 5
    for expr in exprs:
        names = metric_names(expr)
        assert names and names <= served, (expr, names - served)
    for needed in ("step_infra_straggler_score", "step_infra_data_stall_ratio",
                   "step_infra_step_seconds_bucket"):  # fmt: skip
        assert needed in served


@pytest.mark.integration
@pytest.mark.timeout(180)
@NEEDS_PROMETHEUS
def test_prometheus_scrapes_the_job_loads_the_rules_and_answers_every_panel(
    tmp_path: Path,
) -> None:
    dashboard = json.loads(asset(DASHBOARD).read_text())
    with _Job() as job, _prometheus(tmp_path, job.ports, Path(str(asset(ALERTS)))) as prom:
        # Every rank's series, and the controller's score of every rank, are queryable.
        def ranks_seen() -> bool:
            per_rank = _query(prom, "count by (step_infra_rank) (step_infra_section_seconds)")
            scores = _query(prom, "count(step_infra_straggler_score)")
            return (
                len(per_rank) == job.ranks
                and bool(scores)
                and scores[0]["value"][1] == str(job.ranks)
            )

        _wait_for("every rank's metrics in Prometheus", ranks_seen, 60)
        up = _query(prom, "up")
        assert len(up) == job.ranks + 1 and all(r["value"][1] == "1" for r in up)

        # Bounded cardinality: only identity / name labels, and no more series later.
        labels = set(_api(prom, "labels", **{"match[]": '{__name__=~"step_infra_.*"}'}))
        assert labels <= ALLOWED_LABELS, labels - ALLOWED_LABELS
        count_expr = 'count by (__name__) ({__name__=~"step_infra_.*"})'
        before = {r["metric"]["__name__"]: int(r["value"][1]) for r in _query(prom, count_expr)}
        steps_before = job.steps
        _wait_for("more steps", lambda: job.steps > steps_before + 50, 30)
        time.sleep(2.5)  # two more scrapes
        after = {r["metric"]["__name__"]: int(r["value"][1]) for r in _query(prom, count_expr)}
        assert after == before, (before, after)
        # Per metric, at most one series per rank and name/statistic (the histogram: per bucket).
        assert after["step_infra_section_seconds"] == job.ranks * 2 * 3  # 2 sections x 3 stats
        assert after["step_infra_straggler_score"] == job.ranks
        assert after["step_infra_step_seconds_count"] == job.ranks
        assert after["step_infra_step_seconds_bucket"] <= job.ranks * 16
        nodes = _query(prom, "count by (node) (step_infra_straggler_score)")
        assert {r["metric"]["node"] for r in nodes} == set(job.node_of.values())

        # The rules are loaded and evaluate; the slow rank's alert is pending (for: 2m).
        def rules_healthy() -> list[dict[str, Any]] | None:
            groups = _api(prom, "rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            ok = len(rules) == 5 and all(r["health"] == "ok" for r in rules)
            return rules if ok else None

        rules = _wait_for("every alert rule evaluated and healthy", rules_healthy, 30)
        assert {r["name"] for r in rules} == {
            "StepInfraStraggler", "StepInfraDataStall", "StepInfraStepTimeRegression",
            "StepInfraNoProgress", "StepInfraTelemetryDropping",
        }  # fmt: skip

        def straggler_pending() -> list[dict[str, Any]]:
            alerts = _api(prom, "alerts")["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "StepInfraStraggler"]

        alerts = _wait_for("the straggler alert", straggler_pending, 60)
        assert {(a["labels"]["rank"], a["labels"]["node"]) for a in alerts} == {
            (str(SLOW_RANK), job.node_of[str(SLOW_RANK)])
        }
        assert all(a["state"] in ("pending", "firing") for a in alerts)

        # Every Grafana panel's query runs and returns data (variables as Grafana sets them).
        def substitute(expr: str) -> str:
            return (
                expr.replace("$__rate_interval", "15s").replace("$run", RUN).replace("$node", ".*")
            )

        def all_answered() -> list[str] | None:
            empty = [t for t, e in panel_exprs(dashboard) if not _query(prom, substitute(e))]
            return None if empty else ["ok"]

        _wait_for("data for every Grafana panel", all_answered, 60)
        mean_step = _query(prom, substitute(panel_exprs(dashboard)[0][1]))
        assert float(mean_step[0]["value"][1]) == pytest.approx(0.145, rel=1e-6)
        stall = _query(prom, "avg(step_infra_data_stall_ratio)")
        assert float(stall[0]["value"][1]) == pytest.approx(0.01 / 0.145, rel=1e-6)
        assert job.steps > 0
