"""Local prediction check: the real tiny DiT trains, the same step is priced, layouts run on gloo."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest

from step_infra.train.emulator_check import (
    LAYOUTS,
    CheckConfig,
    Layout,
    latent_grid,
    measure_layout,
    predict_layout,
    run_local_check,
)

SMALL = CheckConfig(batch=2, seq_len=32, steps=2, warmup=1, timeout_s=90)


def test_layouts_cover_the_issues_five() -> None:
    assert {(lay.tp, lay.pp, lay.cp, lay.cp_kind, lay.dp) for lay in LAYOUTS.values()} >= {
        (1, 1, 1, "ulysses", 1),
        (1, 1, 1, "ulysses", 2),
        (2, 1, 1, "ulysses", 1),
        (1, 2, 1, "ulysses", 1),
        (1, 1, 2, "ring", 1),
    }
    assert LAYOUTS["PP=2 gloo"].micro_batches > 1  # a pipeline of one micro-batch is all bubble


def test_layout_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="tp, pp, cp, dp, micro_batches must be >= 1"):
        Layout(pp=0)
    with pytest.raises(ValueError, match="cp_kind='zigzag'"):
        Layout(cp=2, cp_kind="zigzag")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="micro_batches=4 needs pp > 1"):
        Layout(micro_batches=4)
    with pytest.raises(ValueError, match="batch=2 does not split into micro_batches=4"):
        Layout(pp=2, micro_batches=4).strategy(SMALL)


def test_strategy_is_the_step_the_check_runs() -> None:
    s = Layout(pp=2, dp=1, micro_batches=4).strategy(CheckConfig(batch=8))
    assert (s.pp, s.micro_batch, s.global_batch) == (2, 2, 8)
    assert not s.distributed_optimizer and not s.overlap_grad_reduce
    ring = Layout(cp=2, cp_kind="ring").strategy(CheckConfig(batch=8))
    assert (ring.cp, ring.cp_kind, ring.micro_batch, ring.global_batch) == (2, "ring", 8, 8)


def test_pp2_and_ring_cp2_are_priced_as_they_run(hardware_profile: Callable[..., Path]) -> None:
    cfg = CheckConfig(batch=4, seq_len=32)
    one = predict_layout(hardware_profile(2), Layout(), cfg)["breakdown"]
    pp = predict_layout(hardware_profile(2), Layout(pp=2, micro_batches=4), cfg)["breakdown"]
    assert pp["micro_batches"] == 4 and pp["t_bubble_s"] > 0 and pp["t_pp_comm_s"] > 0
    assert pp["t_compute_dense_s"] < one["t_compute_dense_s"]  # half the blocks per stage
    ring = predict_layout(hardware_profile(2), Layout(cp=2, cp_kind="ring"), cfg)["breakdown"]
    assert ring["t_cp_comm_exposed_s"] + ring["t_cp_comm_hidden_s"] > 0


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="batch, seq_len, steps, threads must be >= 1"):
        CheckConfig(batch=0)
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        latent_grid(0)


@pytest.mark.parametrize("seq_len", [1, 13, 32, 48, 256, 1000])
def test_latent_grid_holds_every_token(seq_len: int) -> None:
    f, h, w = latent_grid(seq_len)
    assert f * h * w == seq_len
    assert latent_grid(256) == (4, 8, 8)


def test_single_rank_step_is_measured_and_priced(
    tmp_path: Path, hardware_profile: Callable[..., Path]
) -> None:
    measured = measure_layout(Layout(), SMALL)
    assert 0 < measured < 30
    pred = predict_layout(hardware_profile(1), Layout(), SMALL)
    assert pred["step_time_s"] > 0
    # Doubling the batch doubles the matmul work of the step (taller GEMMs run a bit faster,
    # so the time grows less than 2x) but not the ops the host dispatches per micro-batch.
    bigger = predict_layout(hardware_profile(1), Layout(), CheckConfig(batch=4, seq_len=32))
    small, big = pred["breakdown"], bigger["breakdown"]
    assert big["t_compute_dense_s"] > 1.5 * small["t_compute_dense_s"]
    assert big["t_dispatch_exposed_s"] == pytest.approx(small["t_dispatch_exposed_s"])
    assert small["t_dispatch_exposed_s"] > 0  # a CPU profile: every op pays its dispatch
    assert bigger["step_time_s"] > pred["step_time_s"]


def test_tp2_prediction_has_tp_communication(
    tmp_path: Path, hardware_profile: Callable[..., Path]
) -> None:
    pred = predict_layout(hardware_profile(2), Layout(tp=2), SMALL)
    tp_comm = pred["breakdown"].get("t_tp_comm_exposed_s", 0.0) + pred["breakdown"].get(
        "t_tp_comm_hidden_s", 0.0
    )
    assert tp_comm > 0


def test_dp2_prediction_reduces_gradients_after_the_backward(
    tmp_path: Path, hardware_profile: Callable[..., Path]
) -> None:
    # finalize_grads all-reduces once the backward is done: nothing of it is hidden, even on
    # a machine whose collectives could hide under compute
    pred = predict_layout(hardware_profile(2, overlap=0.9), Layout(dp=2), SMALL)
    assert pred["breakdown"]["t_dp_comm_exposed_s"] > 0
    assert pred["breakdown"]["t_dp_comm_hidden_s"] == 0


def test_missing_profile_is_named(tmp_path: Path, hardware_profile: Callable[..., Path]) -> None:
    with pytest.raises(ValueError, match="no hardware profile for 2 rank"):
        run_local_check({1: hardware_profile(1)}, SMALL, layouts={"TP=2 gloo": Layout(tp=2)})


@pytest.mark.integration
@pytest.mark.slow
def test_pp2_and_ring_cp2_run_on_gloo(hardware_profile: Callable[..., Path]) -> None:
    rows = run_local_check(
        {2: hardware_profile(2)},
        CheckConfig(batch=4, seq_len=32, steps=2, warmup=1, timeout_s=120),
        layouts={"PP=2": Layout(pp=2, micro_batches=2), "ring CP=2": Layout(cp=2, cp_kind="ring")},
    )
    assert [(r["layout"], r["pp"], r["cp"]) for r in rows] == [("PP=2", 2, 1), ("ring CP=2", 1, 2)]
    for r in rows:
        assert r["measured_step_s"] > 0 and math.isfinite(r["error"])


@pytest.mark.integration
def test_tp2_and_dp2_run_on_gloo(tmp_path: Path, hardware_profile: Callable[..., Path]) -> None:
    rows = run_local_check(
        {2: hardware_profile(2)},
        SMALL,
        layouts={"DP=2 gloo": Layout(dp=2), "TP=2 gloo": Layout(tp=2)},
    )
    assert [r["layout"] for r in rows] == ["DP=2 gloo", "TP=2 gloo"]
    for r in rows:
        assert r["measured_step_s"] > 0 and math.isfinite(r["error"])


def test_profile_callable_is_called_per_layout(
    tmp_path: Path, hardware_profile: Callable[..., Path]
) -> None:
    calls: list[int] = []

    def profile_for(ranks: int) -> Path:
        calls.append(ranks)
        return hardware_profile(ranks)

    rows = run_local_check(profile_for, SMALL, layouts={"1 rank": Layout()})
    assert calls == [1] and rows[0]["predicted_step_s"] > 0


def test_contended_layout_is_timed_again_and_every_attempt_kept(
    tmp_path: Path, hardware_profile: Callable[..., Path]
) -> None:
    # max_other_load 0 treats any other process as contention: both attempts are used
    rows = run_local_check(
        {1: hardware_profile(1)},
        SMALL,
        layouts={"1 rank": Layout()},
        max_other_load=0.0,
        attempts=2,
    )
    tries = rows[0]["attempts"]
    assert 1 <= len(tries) <= 2 and all(t["measured_step_s"] > 0 for t in tries)
    assert rows[0]["measured_step_s"] == tries[-1]["measured_step_s"]
    assert 0.0 <= rows[0]["other_load"] <= 1.0
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        run_local_check({1: hardware_profile(1)}, SMALL, attempts=0)
