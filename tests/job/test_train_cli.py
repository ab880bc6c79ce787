"""`step-infra train` as an operator runs it: Ctrl-C mid-run, then the same command resumes.

Real processes throughout. After the interrupt: the launcher exits non-zero, no process of the
job (registry, encoder servers, agents, trainers) is left, and the last checkpoint on disk is
complete. The second launch resumes from it and finishes with every sample trained once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from step_infra.elastic.checkpoint import latest_durable
from step_infra.telemetry.events import read_events
from step_infra.train.job.report import job_metrics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def _train(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", "from step_infra.cli import app; app()", "train",
            "--recipe", "micro-t2v", "--no-faults", "--no-auto-split",
            "--run-dir", str(run_dir), *extra]  # fmt: skip


def _job_pids(run_dir: Path) -> set[int]:
    pids = {int(e["pid"]) for e in read_events(run_dir) if "pid" in e}
    for path in list((run_dir / "servers").glob("*.json")) + list(
        (run_dir / "heartbeat").glob("*.json")
    ):
        pids.add(int(json.loads(path.read_text())["pid"]))
    return pids


def _survivors(run_dir: Path, pid_alive: Callable[[int], bool], *, within_s: float) -> list[int]:
    """The job's processes still alive once every one has had ``within_s`` to exit: polled, so
    a loaded machine gets its time and a quiet one does not wait."""
    deadline = time.monotonic() + within_s
    while True:
        left = [pid for pid in _job_pids(run_dir) if pid_alive(pid)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def test_ctrl_c_stops_everything_and_the_same_command_resumes(
    tmp_path: Path, pid_alive: Callable[[int], bool]
) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        _train(run_dir, "--fresh"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # a shell runs background jobs with SIGINT ignored, and Python then installs no
        # KeyboardInterrupt handler: give the job the terminal's default, as Ctrl-C finds it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "events.jsonl").exists() and any(
            e["event"] == "checkpoint" for e in read_events(run_dir)
        ):
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
    proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal delivers
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 1, out.decode()[-2000:]
    assert any(e["event"] == "interrupted" for e in read_events(run_dir))
    left = _survivors(run_dir, pid_alive, within_s=15.0)
    assert left == [], f"processes outlived the job: {left}"
    checkpoint = latest_durable(run_dir / "checkpoints")
    assert checkpoint is not None and (checkpoint / ".metadata").exists()

    resumed = subprocess.run(_train(run_dir), capture_output=True, timeout=300)
    text = resumed.stdout.decode()
    assert resumed.returncode == 0, text[-2000:]
    assert "resuming: checkpoint" in text
    # The interrupted launch's heartbeats are no evidence against the resumed one.
    assert not [e for e in read_events(run_dir) if e["event"] == "hang"]
    assert job_metrics(run_dir)["audit"]["exactly_once"]
