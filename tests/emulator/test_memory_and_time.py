"""Memory formulas against hand-computed cases; time-model invariants; search vs estimate."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from step_infra.emulator import (
    ModelSpec,
    Strategy,
    cluster_for,
    estimate,
    get_model,
    load_plan,
    search,
)
from step_infra.emulator.planner import make_plan, write_plan
from step_infra.emulator.search import pareto, row_strategy

GB = 1e9
SMALL = ModelSpec(name="hand", layers=4, hidden=1024, heads=8, vocab=0, seq_len=2048)


def test_weights_grads_optimizer_by_hand() -> None:
    """4 layers x 12 h^2 (+ 2h norms) = 50.34 M params; 2 + 4 bytes each; Adam 12 bytes
    sharded over dp = 8 with the distributed optimizer, whole without it."""
    params = 4 * (12 * 1024**2 + 2 * 1024) + 2 * 1024
    cluster = cluster_for("h100-sxm", 8)
    e = estimate(SMALL, cluster, Strategy(global_batch=8, distributed_optimizer=True))
    assert e.breakdown["mem_params_gb"] == pytest.approx(2 * params / GB)
    assert e.breakdown["mem_grads_gb"] == pytest.approx(4 * params / GB)
    assert e.breakdown["mem_optimizer_gb"] == pytest.approx(12 * params / 8 / GB)
    whole = estimate(SMALL, cluster, Strategy(global_batch=8, distributed_optimizer=False))
    assert whole.breakdown["mem_optimizer_gb"] == pytest.approx(12 * params / GB)


def test_activations_by_hand_korthikanti() -> None:
    """Korthikanti eq. 2 without the score term: s b h (10 + 24 / t) per layer, 34 s b h / t
    with sequence parallel; full recompute keeps 2 s b h per layer (+ one layer)."""
    cluster = cluster_for("h100-sxm", 8)
    sbh = 2048 * 1 * 1024
    plain = estimate(SMALL, cluster, Strategy(tp=2, global_batch=4))
    assert plain.breakdown["mem_activations_gb"] == pytest.approx(4 * sbh * (10 + 24 / 2) / GB)
    sp = estimate(SMALL, cluster, Strategy(tp=2, sequence_parallel=True, global_batch=4))
    assert sp.breakdown["mem_activations_gb"] == pytest.approx(4 * sbh * 34 / 2 / GB)
    full = estimate(SMALL, cluster, Strategy(tp=2, recompute="full", global_batch=4))
    assert full.breakdown["mem_activations_gb"] == pytest.approx(
        (4 * 2 * sbh + sbh * (10 + 12)) / GB
    )


def test_pipeline_in_flight_micro_batches() -> None:
    """1F1B: the first stage holds min(m, p) micro-batches of its layers; interleaving adds
    (p - 1) / (p v) of that."""
    cluster = cluster_for("h100-sxm", 8)
    per_layer = 2048 * 1024 * 34.0
    one_f = estimate(SMALL, cluster, Strategy(pp=4, global_batch=16))  # dp 2, m 8
    assert one_f.breakdown["mem_activations_gb"] == pytest.approx(1 * 4 * per_layer / GB)
    inter = estimate(SMALL, cluster, Strategy(pp=2, vpp=2, global_batch=16))  # 2 layers/stage
    assert inter.breakdown["mem_activations_gb"] == pytest.approx(
        2 * 2 * (1 + 1 / 4) * per_layer / GB
    )


def test_time_model_physics() -> None:
    model, cluster = get_model("gpt-7.5b"), cluster_for("a100-80g", 128)
    base = estimate(model, cluster, Strategy(tp=4, global_batch=512))
    assert base.step_time_s == pytest.approx(
        sum(v for k, v in base.breakdown.items() if k.startswith("t_") and "hidden" not in k),
        rel=1e-9,
    )
    # recomputation costs time, never saves it; it saves memory
    full = estimate(model, cluster, Strategy(tp=4, global_batch=512, recompute="full"))
    assert full.step_time_s > base.step_time_s and full.memory_gb_per_gpu < base.memory_gb_per_gpu
    # TP across nodes is slower than inside a node: same layout on 4-GPU nodes vs 8-GPU nodes
    narrow = cluster_for("a100-80g", 128, gpus_per_node=4)
    inside = estimate(model, cluster, Strategy(tp=4, pp=2, global_batch=512))
    assert (
        estimate(model, narrow, Strategy(tp=4, pp=2, global_batch=512)).step_time_s
        >= inside.step_time_s
    )
    # bubble follows (p - 1) / (v m)
    b1 = estimate(model, cluster, Strategy(tp=4, pp=4, global_batch=512)).breakdown
    b2 = estimate(model, cluster, Strategy(tp=4, pp=4, vpp=2, global_batch=512)).breakdown
    assert b2["t_bubble_s"] < b1["t_bubble_s"]


def test_search_agrees_with_estimate_and_is_fast() -> None:
    model = get_model("stepvideo-t2v-30b")
    cluster = cluster_for("h100-sxm", 2048)
    t0 = time.perf_counter()
    table = search(model, cluster, global_batch=256)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"search took {elapsed:.2f} s"
    assert len(table) > 1000 and table["fits"].all()
    assert table.iloc[0]["memory_gb_per_gpu"] <= 80.0
    assert table["step_time_s"].is_monotonic_increasing
    rng = np.random.default_rng(0)
    for i in [0, *rng.integers(0, len(table), 5)]:
        row = table.iloc[int(i)]
        e = estimate(model, cluster, row_strategy(row))
        assert e.step_time_s == pytest.approx(row["step_time_s"], rel=1e-9)
        assert e.memory_gb_per_gpu == pytest.approx(row["memory_gb_per_gpu"], rel=1e-9)
    front = pareto(table)
    assert front["memory_gb_per_gpu"].is_monotonic_decreasing
    assert front.iloc[0]["step_time_s"] == table.iloc[0]["step_time_s"]


def test_search_constraints_and_no_layout_error() -> None:
    """Pinned knobs, unknown ones, no layout on one GPU, and a plan with no GPUs left for
    the encoders. That plan is on 16 H100s, not 8: since the activation, replicated-weight and
    ZeRO terms follow what the model and trainer hold (``test_saved_tensors_vs_emulator``),
    the 30B model's best layout on 8 H100s needs about 85 GB (tp 8, full recompute; 77 GB
    was priced before), so one 80 GB node no longer holds it, and the trainers need all 16."""
    model, cluster = get_model("stepvideo-t2v-30b"), cluster_for("h100-sxm", 2048)
    pinned = search(model, cluster, global_batch=256, tp=8)
    assert set(pinned["tp"]) == {8}
    with pytest.raises(ValueError, match="unknown constraint 'tensor'"):
        search(model, cluster, global_batch=256, tensor=8)
    with pytest.raises(ValueError, match="no layout of stepvideo-t2v-30b fits in 80 GB on 1"):
        make_plan(model, cluster_for("h100-sxm", 1), global_batch=8)
    with pytest.raises(ValueError, match="no layout of stepvideo-t2v-30b fits in 80 GB on 8"):
        make_plan(model, cluster_for("h100-sxm", 8), global_batch=8)
    small = make_plan(model, cluster_for("h100-sxm", 16), global_batch=8)
    assert small.allocation is None and "no encoder split" in small.allocation_note


def test_plan_toml_round_trip(tmp_path: Path) -> None:
    plan = make_plan(
        get_model("stepvideo-t2v-30b"), cluster_for("h100-sxm", 2048), global_batch=256
    )
    path = write_plan(plan, tmp_path / "strategy.toml")
    loaded = load_plan(path)  # the launcher and the trainer read the same file, the same way
    assert loaded.preset == "stepvideo-t2v-30b" and loaded.strategy == plan.chosen.strategy
    assert plan.allocation is not None and not plan.allocation.stalls
    assert loaded.allocation is not None
    assert loaded.allocation.trainer_gpus == plan.allocation.trainer_gpus
    grid = loaded.grid()
    assert (grid.tp, grid.pp, grid.cp, grid.dp) == (
        plan.chosen.strategy.tp,
        plan.chosen.strategy.pp,
        plan.chosen.strategy.cp,
        plan.chosen.strategy.dp,
    )
    assert grid.world_size == plan.allocation.trainer_gpus


def test_host_dispatch_hidden_behind_gpu_work_and_paid_on_a_cpu() -> None:
    """A GPU queues ops ahead: dispatch shows only where it outruns the device's work. A CPU
    runs every op itself: each of the stage's ops pays ``op_overhead_us``, every micro-batch."""
    import dataclasses

    big = estimate(
        get_model("gpt-7.5b"), cluster_for("a100-80g", 128), Strategy(tp=4, global_batch=512)
    )
    assert big.breakdown["t_dispatch_exposed_s"] == 0.0
    tiny = ModelSpec(name="tiny", layers=2, hidden=64, heads=2, seq_len=16)
    gpu = cluster_for("h100-sxm", 8)
    on_gpu = estimate(tiny, gpu, Strategy(global_batch=8, micro_batch=1))
    assert on_gpu.breakdown["t_dispatch_exposed_s"] > 0  # a 16-token micro-batch is launch-bound
    cpu = dataclasses.replace(gpu, gpu=dataclasses.replace(gpu.gpu, async_dispatch=False))
    on_cpu = estimate(tiny, cpu, Strategy(global_batch=8, micro_batch=1))
    ops = tiny.layers * tiny.ops_per_layer + tiny.ops_outside_layers
    # dp=8 over the 8 ranks: one micro-batch of the global 8 per rank
    assert on_cpu.breakdown["t_dispatch_exposed_s"] == pytest.approx(
        ops * gpu.gpu.op_overhead_us * 1e-6
    )
    assert on_cpu.step_time_s > on_gpu.step_time_s


def test_update_ops_paid_on_a_cpu_and_hidden_under_the_optimizer_on_a_gpu() -> None:
    """An eager per-tensor optimizer's host ops: a CPU pays each one on top of Adam's memory
    traffic; a GPU queues them and takes the longer of the two."""
    import dataclasses

    fused = ModelSpec(name="tiny", layers=2, hidden=64, heads=2, seq_len=16)
    eager = dataclasses.replace(fused, update_ops_per_layer=256, update_ops_outside_layers=313)
    gpu = cluster_for("h100-sxm", 8)
    cpu = dataclasses.replace(gpu, gpu=dataclasses.replace(gpu.gpu, async_dispatch=False))
    plan = Strategy(global_batch=8, micro_batch=1)
    ops_s = (2 * 256 + 313) * gpu.gpu.op_overhead_us * 1e-6
    t_cpu = {m.update_ops_per_layer: estimate(m, cpu, plan).breakdown for m in (fused, eager)}
    assert t_cpu[256]["t_optimizer_s"] - t_cpu[0]["t_optimizer_s"] == pytest.approx(ops_s)
    on_gpu = estimate(eager, gpu, plan).breakdown["t_optimizer_s"]
    assert on_gpu == pytest.approx(max(t_cpu[0]["t_optimizer_s"], ops_s))
    with pytest.raises(ValueError, match="update_ops_per_layer must be >= 0, got -1"):
        dataclasses.replace(fused, update_ops_per_layer=-1)
