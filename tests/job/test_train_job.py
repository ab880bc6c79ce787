"""The shortened main job, end to end with real processes: registry, encoder servers, torchrun
agents + a hot spare, a trainer killed with -9 mid-run, and an uninterrupted twin run.

Asserts what the people running the job rely on: the job recovers from the last durable
checkpoint; every sample of the stream is trained exactly once (the trainers' ledgers against
the stream's ids); no process outlives the job; the report is written; and the interrupted run
reaches the uninterrupted run's loss.

Tolerance of that last check: each global batch is the same set of samples with the same
noise in both runs, but which replica trained which sample depends on arrival timing, so the
fp32 sums of per-sample gradients are added in a different order (rounding ~1e-7 relative
per step, compounded through AdamW over 24 steps). 1e-4 relative leaves room for that and
none for a skipped or repeated sample, which moves the loss by percents.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

from step_infra.rpc.registry import Registry, RegistryConfig
from step_infra.train.job.config import Faults, micro_t2v
from step_infra.train.job.launcher import run_training_job
from step_infra.train.job.progress import JobProgressPrinter
from step_infra.train.job.report import job_metrics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_killed_trainer_recovers_and_matches_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pid_alive: Callable[[int], bool]
) -> None:
    console = Console(width=120)
    cfg = micro_t2v()
    faulted = run_training_job(
        cfg,
        tmp_path / "faulted",
        on_event=JobProgressPrinter(console, tmp_path / "faulted"),
        fresh=True,
        predict=False,
    )
    assert faulted.ok, faulted.reason
    m = job_metrics(tmp_path / "faulted")
    events = [e["event"] for e in m["faults"]]
    assert "fault_injected" in events and "restart" in events, events
    assert m["audit"]["exactly_once"], m["audit"]
    assert m["audit"]["steps_rerun_after_restart"] >= 1  # rolled back to the checkpoint
    for server in m["servers"]:
        assert not pid_alive(int(server["pid"])), f"{server['name']} outlived the job"
    page = (tmp_path / "faulted" / "report.html").read_text()
    assert "Training job" in page and "data:image/gif;base64" in page
    assert len(faulted.samples) == cfg.sample_prompts

    clean_dir = tmp_path / "clean"
    (clean_dir / "assets").mkdir(parents=True)
    shutil.copy(tmp_path / "faulted" / "assets" / "vae.pt", clean_dir / "assets" / "vae.pt")
    # the twin joins a registry that is already running instead of starting its own
    monkeypatch.setenv("STEP_TOKEN", "twin-token")
    with Registry(RegistryConfig(host="127.0.0.1", port=0, token="twin-token")) as registry:
        clean = run_training_job(
            cfg.replace(faults=Faults()),
            clean_dir,
            on_event=JobProgressPrinter(console, clean_dir),
            predict=False,
            sample=False,
            registry=registry.address,
        )
    assert clean.ok, clean.reason
    reference = job_metrics(clean_dir)
    assert reference["audit"]["exactly_once"]
    last = cfg.steps - 1
    a, b = m["loss_by_step"][last], reference["loss_by_step"][last]
    assert abs(a - b) <= 1e-4 * abs(b), f"loss at step {last}: resumed {a} vs uninterrupted {b}"
    (tmp_path / "losses.json").write_text(json.dumps({"resumed": a, "uninterrupted": b}))
