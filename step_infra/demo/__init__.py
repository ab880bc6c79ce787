"""Demos and their fixtures: ``make demo``'s stages, the eviction story on a toy elastic job,
and simulated telemetry runs that tests and benchmarks draw dashboards from.

Names load their module on first use (PEP 562), so the CLI can import
``step_infra.demo.cli`` without torch.
"""

from __future__ import annotations

from typing import Any

from step_infra.lazy import lazy_attribute

_EXPORTS = {
    "DemoStageError": "run",
    "run_demo": "run",
    "stage_environment": "run",
    "run_eviction_story": "story",
    "write_simulated_run": "simulate",
    "write_synthetic_store": "simulate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _EXPORTS, name)
