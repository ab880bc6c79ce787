"""Elastic control: the controller that keeps a job running through slow and failed nodes.

The controller (:mod:`~step_infra.elastic.controller`) starts TorchElastic agents and hot
spares (:mod:`~step_infra.elastic.agents`), feeds the telemetry store's rows to the
straggler detector (:mod:`~step_infra.elastic.feed`, :mod:`~step_infra.elastic.watch`), asks
an :class:`EvictionPolicy` what to do and acts. Workers speak to it through an
:class:`ElasticSession` (identity, heartbeats, generations, distributed checkpoints). It reads
telemetry (detector, store, events); telemetry never imports it.

Names load their module on first use (PEP 562): importing the package starts nothing.
"""

from __future__ import annotations

from typing import Any

from step_infra.lazy import lazy_attribute

_EXPORTS = {
    "ElasticConfig": "controller",
    "ElasticResult": "controller",
    "run_elastic_job": "controller",
    "Checkpointer": "checkpoint",
    "DetectOnly": "policy",
    "Evict": "policy",
    "EvictionPolicy": "policy",
    "make_policy": "policy",
    "ElasticSession": "session",
    "StragglerWatch": "watch",
    "WorkerEnv": "worker_env",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _EXPORTS, name)
