"""Hangs: a resumed launch never judges liveness from an earlier launch's files, and a rank that
stops making progress is named from heartbeats and recovered from, not fatal."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from step_infra.demo.toy_worker import TOY_WORKER, reference_losses
from step_infra.elastic.agents import is_launch_process
from step_infra.elastic.controller import (
    ElasticConfig,
    ElasticController,
    hung_ranks,
    run_elastic_job,
)
from step_infra.elastic.worker_env import (
    LAUNCH_ENV,
    Heartbeat,
    WorkerEnv,
    read_heartbeats,
)
from step_infra.telemetry import read_events, read_store
from step_infra.telemetry.detector import DetectorConfig
from step_infra.telemetry.events import EventLog


def _config(run_dir: Path, **overrides: Any) -> ElasticConfig:
    """A 2-node job without spares (the detector plays no part in these tests)."""
    return ElasticConfig(run_dir=run_dir, nodes=2, spares=0, detector=DetectorConfig(), **overrides)


def _heartbeat(run_dir: Path, node: str, **fields: Any) -> None:
    """A heartbeat file as a worker writes it (``fields`` override the defaults)."""
    now = time.time()
    hb = {"node": node, "rank": int(node[-1]), "step": 5, "phase": "step", "generation": 2,
          "pid": 1, "t_unix_s": now, "alive_unix_s": now}  # fmt: skip
    hb.update(fields)
    (run_dir / "heartbeat").mkdir(parents=True, exist_ok=True)
    (run_dir / "heartbeat" / f"{node}.r0.json").write_text(json.dumps(hb))


def _interrupted_launch(run_dir: Path) -> None:
    """What a launch stopped by Ctrl-C leaves behind: its events (two generations, a
    checkpoint) and heartbeats of its last generation, 79 s old."""
    controller = EventLog(run_dir, source="controller")
    controller.emit("job_start", nodes=2)
    for gen in (1, 2):
        for node in ("node0", "node1"):
            EventLog(run_dir, source=f"{node}/rank{node[-1]}").emit(
                "worker_start", node=node, rank=int(node[-1]), world_size=2, generation=gen,
                resume_step=0 if gen == 1 else 4, grad_accum=3,
            )  # fmt: skip
        EventLog(run_dir, source="node0/rank0").emit("checkpoint", step=3, loss=0.5)
    controller.emit("interrupted")
    old = time.time() - 79.4
    for node in ("node0", "node1"):
        _heartbeat(run_dir, node, generation=2, t_unix_s=old, alive_unix_s=old)


def test_a_resumed_launch_ignores_the_interrupted_launchs_heartbeats_and_events(
    tmp_path: Path,
) -> None:
    """The resumed-run hang of issue 15: the new controller replayed the old launch's
    worker_start events, took on their generation and members, and then found that
    generation's heartbeats 79 s old: "job silent", 0.0 s after its job_start."""
    run_dir = tmp_path / "run"
    _interrupted_launch(run_dir)
    controller = ElasticController(_config(run_dir))
    controller._poll_events()
    controller._check_heartbeats([])  # raised "job silent for 79 s > 60.0 s" before the fix
    assert controller._generation == 0 and controller._active() == []
    assert controller._last_step == -1  # the old launch's checkpoint is not this one's progress
    assert not [e for e in read_events(run_dir) if e["event"] == "hang"]


def test_a_launch_judges_its_own_workers_only(tmp_path: Path) -> None:
    """Old files stay ignored while this launch's workers start and beat; once its own
    heartbeats go stale, the hang names the frozen rank."""
    run_dir = tmp_path / "run"
    _interrupted_launch(run_dir)
    controller = ElasticController(_config(run_dir, step_timeout_s=10.0))
    mine = {"launch": controller.launch}
    for node in ("node0", "node1"):
        EventLog(run_dir, source=f"{node}/rank{node[-1]}", context=mine).emit(
            "worker_start", node=node, rank=int(node[-1]), world_size=2, generation=3,
            resume_step=4, grad_accum=3,
        )  # fmt: skip
    controller._poll_events()
    assert controller._generation == 3 and sorted(controller._active()) == ["node0", "node1"]
    for node in ("node0", "node1"):
        _heartbeat(run_dir, node, generation=3, step=6, **mine)
    controller._check_heartbeats([])
    assert controller._last_step == 6

    # node1 is frozen (no pulse for 30 s), node0 waits for it at the collective (pulsing).
    # The pid in node1's heartbeat (1) is not this launch's process: the controller must say
    # so rather than kill a stranger.
    now = time.time()
    _heartbeat(run_dir, "node0", generation=3, step=7, phase="collective",
               t_unix_s=now - 29, alive_unix_s=now, **mine)  # fmt: skip
    _heartbeat(run_dir, "node1", generation=3, step=6, t_unix_s=now - 30,
               alive_unix_s=now - 30, **mine)  # fmt: skip
    with pytest.raises(RuntimeError, match="could not stop the hung workers"):
        controller._check_heartbeats([])
    hang = next(e for e in read_events(run_dir) if e["event"] == "hang")
    assert hang["node"] == "node1" and hang["ranks"] == ["node1/r1"]
    assert hang["evidence"]["how"] == "frozen" and hang["step"] == 6
    assert hang["launch"] == controller.launch


@contextlib.contextmanager
def _stopped_process(launch: str) -> Iterator[subprocess.Popen[bytes]]:
    """A process of ``launch`` (by its environment) that this test SIGSTOPs, killed at the end."""
    env = {**os.environ, LAUNCH_ENV: launch}
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env=env)
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@pytest.mark.timeout(60)
def test_a_frozen_rank_is_killed_and_the_job_restarts(tmp_path: Path) -> None:
    """No spare: the frozen worker is SIGKILLed (SIGTERM would wait for a SIGCONT), the
    controller waits for the restart, and the new generation's first step is 'recovered'."""
    run_dir = tmp_path / "run"
    controller = ElasticController(_config(run_dir, step_timeout_s=10.0))
    mine = {"launch": controller.launch}
    with _stopped_process(controller.launch) as frozen:
        for node in ("node0", "node1"):
            EventLog(run_dir, source=node, context=mine).emit(
                "worker_start", node=node, world_size=2, generation=1, resume_step=0,
                grad_accum=3,
            )  # fmt: skip
        controller._poll_events()
        now = time.time()
        _heartbeat(run_dir, "node0", generation=1, step=7, phase="collective",
                   t_unix_s=now - 29, alive_unix_s=now, **mine)  # fmt: skip
        _heartbeat(run_dir, "node1", generation=1, step=6, t_unix_s=now - 30,
                   alive_unix_s=now - 30, pid=frozen.pid, **mine)  # fmt: skip
        controller._check_heartbeats([])
        assert frozen.wait(timeout=10) == -signal.SIGKILL
        assert controller._restarting_since is not None

        for node in ("node0", "node1"):  # TorchElastic restarted both from the checkpoint
            EventLog(run_dir, source=node, context=mine).emit(
                "worker_start", node=node, world_size=2, generation=2, resume_step=6,
                grad_accum=3,
            )  # fmt: skip
            _heartbeat(run_dir, node, generation=2, step=6, **mine)
        controller._poll_events()
        controller._check_heartbeats([])
    story = [e["event"] for e in read_events(run_dir) if e["source"] == "controller"]
    assert story == ["hang", "restart", "recovered"], story
    recovered = read_events(run_dir)[-1]
    assert recovered["cause"] == "hang" and recovered["step"] == 6


def test_hung_ranks_tells_the_stuck_rank_from_those_waiting_for_it() -> None:
    now = 1000.0

    def hb(node: str, step: int, phase: str, alive_age_s: float = 0.5) -> dict[str, Any]:
        return {"node": node, "rank": 0, "step": step, "phase": phase, "t_unix_s": now - 20,
                "alive_unix_s": now - alive_age_s}  # fmt: skip

    # Alive but stuck in step 8 (a sleep, a dead data loader): the others wait at its collective.
    hung, how = hung_ranks(
        [hb("a", 7, "step"), hb("b", 8, "collective"), hb("c", 8, "collective")],
        now=now, frozen_after_s=3.0,
    )  # fmt: skip
    assert how == "behind" and [h["node"] for h in hung] == ["a"]
    # Frozen inside the collective itself: only the missing pulse tells.
    hung, how = hung_ranks(
        [hb("a", 8, "collective", alive_age_s=20), hb("b", 8, "collective")],
        now=now, frozen_after_s=3.0,
    )  # fmt: skip
    assert how == "frozen" and [h["node"] for h in hung] == ["a"]
    # Everyone at the same point and alive: nobody to blame, every rank restarts.
    assert hung_ranks([hb("a", 8, "collective"), hb("b", 8, "collective")], now=now,
                      frozen_after_s=3.0) == ([], "unknown")  # fmt: skip


@pytest.mark.timeout(30)
def test_heartbeat_pulses_between_steps_and_carries_the_launch(tmp_path: Path) -> None:
    env = WorkerEnv(run_dir=tmp_path, node="node0", rank=0, world_size=1, local_rank=0,
                    restart_count=0, launch="abc123")  # fmt: skip
    beat = Heartbeat(env, generation=4, pulse_s=0.05)
    try:
        beat.beat(step=3, phase="step")
        first = read_heartbeats(tmp_path)[0]
        assert first["launch"] == "abc123" and first["generation"] == 4
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # wait for a pulse, however loaded the machine
            latest = read_heartbeats(tmp_path)
            if latest and latest[0]["alive_unix_s"] > first["alive_unix_s"]:
                break
            time.sleep(0.02)
        else:
            pytest.fail("no liveness pulse within 20 s")
        assert latest[0]["t_unix_s"] == first["t_unix_s"] and latest[0]["step"] == 3
    finally:
        beat.close()


class _Freezer(threading.Thread):
    """SIGSTOPs ``node``'s worker once its heartbeat reports ``at_step`` (what a wedged host
    looks like from outside: the process is there, but neither steps nor pulses)."""

    def __init__(self, run_dir: Path, node: str, at_step: int) -> None:
        super().__init__(daemon=True, name="freezer")
        self.run_dir, self.node, self.at_step = run_dir, node, at_step
        self.stop = threading.Event()
        self.frozen: dict[str, Any] | None = None

    def run(self) -> None:
        while self.frozen is None and not self.stop.wait(0.05):
            for hb in read_heartbeats(self.run_dir):
                if hb.get("node") == self.node and int(hb.get("step", -1)) >= self.at_step:
                    os.kill(int(hb["pid"]), signal.SIGSTOP)
                    self.frozen = hb
                    return

    def kill(self) -> None:
        """SIGKILL the process this thread stopped, if the job left it behind (it must not)."""
        if self.frozen is not None and is_launch_process(
            int(self.frozen["pid"]), str(self.frozen["launch"])
        ):
            os.kill(int(self.frozen["pid"]), signal.SIGKILL)


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.parametrize("spares", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_a_sigstopped_rank_is_named_and_the_job_recovers(
    tmp_path: Path, pid_alive: Callable[[int], bool], spares: int
) -> None:
    """2 nodes; node1's worker is SIGSTOPped at step 7. The hang names node1 (its pulse
    stopped) and the controller SIGKILLs it. Without a spare TorchElastic restarts both
    workers from the last checkpoint; with one, node1 is evicted and the spare takes its
    place. Either way the job completes with the fault-free loss curve: every step's samples
    applied exactly once."""
    steps = 16
    run_dir = tmp_path / "hang"
    freezer = _Freezer(run_dir, "node1", at_step=7)
    cfg = ElasticConfig(
        run_dir=run_dir,
        worker_args=(*TOY_WORKER, "--steps", str(steps), "--compute-s", "0.1"),
        nodes=2,
        spares=spares,
        step_timeout_s=5.0,
        job_timeout_s=150,
    )
    freezer.start()
    try:
        result = run_elastic_job(cfg)
    finally:
        freezer.stop.set()
        freezer.join(timeout=5)
        freezer.kill()
    events = read_events(run_dir)
    story = [e["event"] for e in events if e["source"] == "controller"]
    assert freezer.frozen is not None, "the worker was never stopped"
    assert result.ok and result.last_step == steps - 1, (result, story)
    hang = next(e for e in events if e["event"] == "hang")
    assert hang["node"] == "node1" and hang["ranks"] == [f"node1/r{freezer.frozen['rank']}"]
    assert hang["evidence"]["how"] == "frozen"
    assert story.index("hang") < story.index("restart") < story.index("recovered"), story
    if spares:
        assert result.evicted == ["node1"] and result.joined == ["spare0"], result
        assert story.index("hang") < story.index("eviction") < story.index("spare_activated")
        eviction = next(e for e in events if e["event"] == "eviction")
        assert eviction["reason"].startswith("hang: ") and "node1" in eviction["reason"]
    else:
        assert result.evicted == [] and "eviction" not in story, story
    assert not pid_alive(int(freezer.frozen["pid"]))

    # Exactly once: the generation after the hang resumes right after the last checkpoint
    # and its losses are the fault-free run's (a step trained twice or skipped would not be).
    checkpoints = [e["step"] for e in events if e["event"] == "checkpoint"]
    restart = next(e for e in events if e["event"] == "restart")
    assert restart["resume_step"] == max(s for s in checkpoints if s <= hang["step"]) + 1
    df = read_store(run_dir)
    loss = df[(df["name"] == "loss") & (df["rank"] == 0)]
    last = loss[loss["attempt"] == loss["attempt"].max()].sort_values("step")
    assert list(last["step"]) == list(range(restart["resume_step"], steps))
    reference = reference_losses(steps)
    for step, value in zip(last["step"], last["value"], strict=True):
        assert value == pytest.approx(reference[step], rel=1e-4, abs=1e-6), step
