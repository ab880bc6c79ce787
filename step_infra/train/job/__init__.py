"""The streaming training job: ``step-infra train`` as real processes.

``config`` (what a job is, saved as the run's ``config.toml``), ``launcher`` (the job's
phases: assets, prediction, encoder servers, elastic trainers, samples, report), ``worker``
(one trainer rank), ``progress`` (the console view of a job), ``assets``, ``prediction`` and
``report``. Names load their module on first use (PEP 562).
"""

from __future__ import annotations

from typing import Any

from step_infra.lazy import lazy_attribute

_EXPORTS = {
    "JobConfig": "config",
    "apply_plan": "config",
    "get_recipe": "config",
    "JobEvent": "launcher",
    "TrainingJob": "launcher",
    "TrainResult": "launcher",
    "run_training_job": "launcher",
    "JobProgressPrinter": "progress",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _EXPORTS, name)
