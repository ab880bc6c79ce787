"""Eviction and recovery through TorchElastic: real torchrun agents, a tiny model on gloo."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from step_infra.demo.toy_worker import TOY_WORKER, reference_losses
from step_infra.elastic.controller import ElasticConfig, run_elastic_job
from step_infra.elastic.worker_env import WorkerEnv
from step_infra.telemetry import read_events, read_store


def test_worker_env_rejects_a_bad_slow_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEP_INFRA_RUN_DIR", "/tmp/x")
    monkeypatch.setenv("STEP_INFRA_NODE", "node1")
    monkeypatch.setenv("STEP_INFRA_SLOW", "node1:20:1.3")
    env = WorkerEnv.from_env()
    assert env.slowdown(19) == 1.0 and env.slowdown(20) == 1.3
    monkeypatch.setenv("STEP_INFRA_SLOW", "node1-slow")
    with pytest.raises(ValueError, match="expected 'node:from_step:factor'"):
        WorkerEnv.from_env()


def test_config_validates() -> None:
    with pytest.raises(ValueError, match="spares=-1"):
        ElasticConfig(run_dir=Path("x"), spares=-1)
    with pytest.raises(ValueError, match="got 'kill'"):
        ElasticConfig(run_dir=Path("x"), policy="kill")


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_slow_node_is_evicted_and_the_spare_takes_over(
    tmp_path: Path, pid_alive: Callable[[int], bool]
) -> None:
    """3 agents + 1 spare; node1 becomes 30 % slower at step 15 -> detected, evicted, the
    spare joins, training resumes from the checkpoint with the same global batch."""
    steps = 45
    run_dir = tmp_path / "e2e"
    cfg = ElasticConfig(
        run_dir=run_dir,
        worker_args=(*TOY_WORKER, "--steps", str(steps), "--compute-s", "0.1"),
        nodes=3,
        spares=1,
        slow="node1:15:1.3",
        job_timeout_s=280,
        # 45 steps are too few for any eviction to pay for its restart (the pricing has its
        # own tests): margin 0 evicts on the detection, to test the eviction machinery.
        eviction_margin=0.0,
    )
    result = run_elastic_job(cfg)
    events = read_events(run_dir)
    story = [e["event"] for e in events if e["source"] == "controller"]
    assert result.ok, (result, story)
    assert result.evicted == ["node1"] and result.joined == ["spare0"]
    assert result.restarts == 1 and result.last_step == steps - 1
    assert result.detection_to_resume_s is not None and result.detection_to_resume_s < 60

    # events.jsonl tells the story, in order, with evidence.
    for earlier, later in [
        ("detection", "eviction"),
        ("eviction", "restart"),
        ("restart", "join"),
        ("join", "recovered"),
        ("recovered", "job_end"),
    ]:
        assert story.index(earlier) < story.index(later), story
    detection = next(e for e in events if e["event"] == "detection")
    assert detection["node"] == "node1" and detection["step"] >= 15
    (trace,) = detection["evidence"]["windows"].values()  # node1's one rank
    assert trace[-1]["flagged"]
    assert detection["effect"] > 0.05
    join = next(e for e in events if e["event"] == "join")
    assert join["world_size"] == 3 and join["grad_accum"] == 2

    # The loss after the resume continues the checkpoint: it matches a fault-free reference.
    df = read_store(run_dir)
    loss = df[(df["name"] == "loss") & (df["rank"] == 0)]
    reference = reference_losses(steps)
    last_gen = loss["attempt"].max()
    resumed = loss[loss["attempt"] == last_gen].sort_values("step")
    assert resumed["step"].iloc[0] > 0
    for step, value in zip(resumed["step"], resumed["value"], strict=True):
        assert value == pytest.approx(reference[step], rel=1e-4, abs=1e-6), step
    # Before the eviction, node1 reached the gradient all-reduce last, by about its 30 ms.
    arrivals = df[df["kind"] == "arrival"]
    first = arrivals.groupby(["attempt", "step", "name"])["t_unix_s"].transform("min")
    late = arrivals.assign(lateness_s=arrivals["t_unix_s"] - first)
    slow_phase = late[(late["attempt"] == 1) & (late["step"] >= 16)]
    by_node = slow_phase.groupby("node")["lateness_s"].mean()
    assert by_node.idxmax() == "node1" and by_node["node1"] > 0.015, by_node
    nodes_after = set(df[df["attempt"] == last_gen]["node"])
    assert nodes_after == {"node0", "node2", "spare0"}

    # Nothing is left running.
    starts = [e for e in events if e["event"] == "agent_start"]
    assert len(starts) == 4
    assert not any(pid_alive(e["pid"]) for e in starts)


def _toy(*extra: str, steps: int = 30) -> tuple[str, ...]:
    return (*TOY_WORKER, "--steps", str(steps), "--compute-s", "0.05", *extra)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_long_checkpoint_save_is_not_a_hang_but_a_stuck_step_is(tmp_path: Path) -> None:
    """A 6 s save under a 4 s step timeout completes (checkpoint timeout applies); a rank
    stuck in a step for longer than the step timeout is a 'hang' naming it. The job restarts
    from the checkpoint, hangs at the same step again, and fails once the restarts bring no
    progress, saying so."""
    slow_save = ElasticConfig(
        run_dir=tmp_path / "save",
        worker_args=_toy("--save-delay-s", "6", "--checkpoint-every", "10", steps=25),
        nodes=2,
        spares=0,
        step_timeout_s=4.0,
        checkpoint_timeout_s=60.0,
    )
    result = run_elastic_job(slow_save)
    assert result.ok, result
    assert not [e for e in read_events(tmp_path / "save") if e["event"] == "hang"]

    stuck = ElasticConfig(
        run_dir=tmp_path / "hang",
        worker_args=_toy("--hang-at-step", "8"),
        nodes=2,
        spares=0,
        step_timeout_s=4.0,
        checkpoint_timeout_s=60.0,
        restarts_without_progress=1,
    )
    result = run_elastic_job(stuck)
    assert not result.ok and "restarts without progress" in result.reason, result
    assert "hang" in result.reason and "silent" in result.reason
    events = read_events(tmp_path / "hang")
    hang = [e for e in events if e["event"] == "hang"]
    assert hang and hang[0]["phase"] == "step" and hang[0]["timeout_s"] == 4.0
    # The stuck rank is global rank 0 (it sleeps alive; the other waits at the collective).
    rank0 = {e["generation"]: e["node"] for e in events if e.get("rank") == 0 and
             e["event"] == "worker_start"}  # fmt: skip
    for h in hang:
        assert h["ranks"] == [f"{rank0[h['generation']]}/r0"], h
        assert h["evidence"]["how"] == "behind"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_job_stops_after_restarts_without_progress(tmp_path: Path) -> None:
    """A step that always crashes: TorchElastic restarts from the checkpoint each time; the
    controller gives up once more than ``restarts_without_progress`` brought no new step."""
    cfg = ElasticConfig(
        run_dir=tmp_path / "crash",
        worker_args=_toy("--crash-at-step", "7"),
        nodes=2,
        spares=0,
        restarts_without_progress=1,
        agent_max_restarts=10,
    )
    result = run_elastic_job(cfg)
    assert not result.ok and "without progress" in result.reason, result
    restarts = [e for e in read_events(tmp_path / "crash") if e["event"] == "restart"]
    assert [e["restarts_without_progress"] for e in restarts][-1] == 2
    assert all(e["resume_step"] == 6 for e in restarts)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_detect_only_policy_logs_but_keeps_the_slow_node(tmp_path: Path) -> None:
    cfg = ElasticConfig(
        run_dir=tmp_path / "detect",
        worker_args=_toy(steps=40),
        nodes=3,
        spares=1,
        policy="detect",
        slow="node1:12:1.3",
    )
    result = run_elastic_job(cfg)
    assert result.ok and result.evicted == [] and result.joined == [] and result.restarts == 0
    events = read_events(tmp_path / "detect")
    detections = [e for e in events if e["event"] == "detection"]
    assert [d["node"] for d in detections] == ["node1"]
    assert not [e for e in events if e["event"] in ("eviction", "join", "restart")]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_without_a_spare_the_job_shrinks_and_keeps_the_global_batch(tmp_path: Path) -> None:
    """nodes=3, min_nodes=2, no spare: the slow node is evicted and training goes on with 2
    ranks, 3 micro-batches each instead of 2, and the same loss curve."""
    steps = 35
    cfg = ElasticConfig(
        run_dir=tmp_path / "shrink",
        worker_args=_toy(steps=steps),
        nodes=3,
        min_nodes=2,
        spares=0,
        slow="node1:12:1.3",
        eviction_margin=0.0,  # too short a job for an eviction to pay: test the machinery
    )
    result = run_elastic_job(cfg)
    assert result.ok and result.evicted == ["node1"] and result.joined == [], result
    restart = next(e for e in read_events(tmp_path / "shrink") if e["event"] == "restart")
    assert restart["world_size"] == 2 and restart["grad_accum"] == 3
    df = read_store(tmp_path / "shrink")
    loss = df[(df["name"] == "loss") & (df["rank"] == 0)]
    after = loss[loss["attempt"] == loss["attempt"].max()]
    reference = reference_losses(steps)
    for step, value in zip(after["step"], after["value"], strict=True):
        assert value == pytest.approx(reference[step], rel=1e-4, abs=1e-6), step


def test_min_nodes_is_validated() -> None:
    with pytest.raises(ValueError, match="min_nodes must be between 1 and nodes=3, got 4"):
        ElasticConfig(run_dir=Path("x"), nodes=3, min_nodes=4)
