"""Grafana dashboard and Prometheus alert rules for a step-infra job, shipped as package data.

``step_infra_dashboard.json`` (import it into Grafana, pick the Prometheus data source),
``alerts.yml`` (Prometheus ``rule_files``) and ``alerts_test.yml`` (``promtool test rules``)
query the metrics :mod:`step_infra.telemetry.otel` exports, by the names and labels its
Prometheus endpoint really serves (``tests/telemetry/test_prometheus.py`` checks them against
a live scrape in a real Prometheus). See README.md in this folder.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

DASHBOARD = "step_infra_dashboard.json"
ALERTS = "alerts.yml"
ALERTS_TEST = "alerts_test.yml"


def asset(name: str) -> Traversable:
    """One of the shipped files (:data:`DASHBOARD`, :data:`ALERTS`, :data:`ALERTS_TEST`)."""
    if name not in (DASHBOARD, ALERTS, ALERTS_TEST):
        raise ValueError(
            f"no grafana asset {name!r}; expected one of {DASHBOARD}, {ALERTS}, {ALERTS_TEST}"
        )
    return resources.files(__name__) / name
