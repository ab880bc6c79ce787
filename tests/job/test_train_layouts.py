"""The streaming job on the planner's kinds of layout, end to end with real processes: a plan
of tp2 x pp2 (pipeline stages, sequence parallel, selective recompute) and one of ring cp2 x
dp2 (ZeRO-1, gradients reduced in buckets during the backward, full recompute), each through
the micro job's kill -9, recovered from the last durable checkpoint with every sample trained
exactly once (the trainers' ledgers against the stream's ids).

And the planner's own 30B plan (tp1 pp3 vpp8 ring cp8 dp64, full recompute, ZeRO-1,
overlapped gradient reduction on 2,048 H100s) with every dimension above one scaled to two:
pp2 vpp2 ring cp2 dp2 on 2 nodes x 4 ranks of tiny-dit, a few steps.

Slow (jobs of two to three minutes each on two cores): ``make test-all``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from step_infra.emulator import cluster_for, get_model
from step_infra.emulator.plan import ModelRef, Plan
from step_infra.emulator.planner import make_plan
from step_infra.train.job.config import (
    Faults,
    apply_plan,
    job_strategy,
    micro_t2v,
    tiny_t2v,
    trainer_layout,
)
from step_infra.train.job.launcher import run_training_job
from step_infra.train.job.report import job_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

LAYOUTS = {
    "tp2pp2": job_strategy(
        tp=2, pp=2, sequence_parallel=True, recompute="selective", micro_batch=2, global_batch=8
    ),
    "cp2ring_dp2": job_strategy(
        cp=2,
        cp_kind="ring",
        recompute="full",
        distributed_optimizer=True,
        overlap_grad_reduce=True,
        micro_batch=2,
        global_batch=8,
    ),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_plan_layout_survives_a_kill_with_exactly_once_data(tmp_path: Path, name: str) -> None:
    plan = Plan(model=ModelRef(preset="micro-dit"), strategy=LAYOUTS[name])
    cfg = apply_plan(micro_t2v(), Plan.loads(plan.dumps()))  # through the plan's TOML
    layout = trainer_layout(cfg)
    assert ("pp=2" in layout) == (name == "tp2pp2"), layout
    result = run_training_job(cfg, tmp_path / name, fresh=True, predict=False, sample=False)
    assert result.ok, result.reason
    m = job_metrics(tmp_path / name)
    events = [e["event"] for e in m["faults"]]
    assert "fault_injected" in events and "restart" in events, events
    assert m["audit"]["exactly_once"], m["audit"]
    assert m["audit"]["steps_rerun_after_restart"] >= 1
    losses = m["loss_by_step"]
    first, last = float(losses["0"]), float(losses[str(cfg.steps - 1)])
    assert last < first, f"the loss did not fall: {first} -> {last}"


def test_the_planners_30b_plan_scaled_to_8_ranks_trains(tmp_path: Path) -> None:
    big = make_plan(get_model("stepvideo-t2v-30b"), cluster_for("h100-sxm", 2048), global_batch=256)
    s = big.strategy
    scaled = dataclasses.replace(
        s,
        **{k: min(getattr(s, k), 2) for k in ("tp", "pp", "vpp", "cp", "dp")},
        global_batch=16,
    )
    assert scaled.tp * scaled.pp * scaled.cp * (scaled.dp or 1) == 8, scaled
    plan = Plan(model=ModelRef(preset="tiny-dit"), strategy=scaled)
    base = tiny_t2v().replace(steps=4, faults=Faults(), vae_steps=20)
    base = base.replace(elastic=dataclasses.replace(base.elastic, nproc_per_node=4))
    cfg = apply_plan(base, Plan.loads(plan.dumps()))
    result = run_training_job(cfg, tmp_path / "scaled", fresh=True, predict=False, sample=False)
    assert result.ok, (result.reason, trainer_layout(cfg))
    m = job_metrics(tmp_path / "scaled")
    assert m["audit"]["exactly_once"], m["audit"]


def test_job_binds_and_advertises_the_given_address(tmp_path: Path) -> None:
    """``--host``: the registry, the encoder servers (what they advertise) and the
    rendezvous use the given address, here a second loopback address (127.0.0.2)."""
    base = micro_t2v().replace(steps=4, faults=Faults())
    cfg = base.replace(
        elastic=dataclasses.replace(base.elastic, host="127.0.0.2"),
        servers=dataclasses.replace(base.servers, host="127.0.0.2"),
    )
    result = run_training_job(cfg, tmp_path / "host", fresh=True, predict=False, sample=False)
    assert result.ok, result.reason
    logs = tmp_path / "host" / "logs"
    assert "registry listening on 127.0.0.2:" in (logs / "registry.log").read_text()
    assert job_metrics(tmp_path / "host")["audit"]["exactly_once"]
