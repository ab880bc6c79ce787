"""The job's report: the telemetry dashboard page plus what the people running the job ask.

Stub; filled in below once the store's rows are known.
"""

from __future__ import annotations

from pathlib import Path

from step_infra.telemetry.dashboard import render_report


def write_job_report(run_dir: Path) -> Path:
    return render_report(run_dir)
