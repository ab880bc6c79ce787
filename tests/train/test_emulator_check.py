"""Local prediction check: the real tiny DiT trains, the same step is priced, layouts run on gloo."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest

from step_infra.train.emulator_check import (
    CheckConfig,
    latent_grid,
    measure_layout,
    predict_layout,
    run_local_check,
)

SMALL = CheckConfig(batch=2, seq_len=32, steps=2, warmup=1, timeout_s=90)


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
    measured = measure_layout(1, 1, SMALL)
    assert 0 < measured < 30
    pred = predict_layout(hardware_profile(1), 1, 1, SMALL)
    assert pred["step_time_s"] > 0
    # Doubling the batch doubles the matmul work of the step (taller GEMMs run a bit faster,
    # so the time grows less than 2x) but not the ops the host dispatches per micro-batch.
    bigger = predict_layout(hardware_profile(1), 1, 1, CheckConfig(batch=4, seq_len=32))
    small, big = pred["breakdown"], bigger["breakdown"]
    assert big["t_compute_dense_s"] > 1.5 * small["t_compute_dense_s"]
    assert big["t_dispatch_exposed_s"] == pytest.approx(small["t_dispatch_exposed_s"])
    assert small["t_dispatch_exposed_s"] > 0  # a CPU profile: every op pays its dispatch
    assert bigger["step_time_s"] > pred["step_time_s"]


def test_tp2_prediction_has_tp_communication(
    tmp_path: Path, hardware_profile: Callable[..., Path]
) -> None:
    pred = predict_layout(hardware_profile(2), 2, 1, SMALL)
    tp_comm = pred["breakdown"].get("t_tp_comm_exposed_s", 0.0) + pred["breakdown"].get(
        "t_tp_comm_hidden_s", 0.0
    )
    assert tp_comm > 0


def test_dp2_prediction_reduces_gradients_after_the_backward(
    tmp_path: Path, hardware_profile: Callable[..., Path]
) -> None:
    # finalize_grads all-reduces once the backward is done: nothing of it is hidden, even on
    # a machine whose collectives could hide under compute
    pred = predict_layout(hardware_profile(2, overlap=0.9), 1, 2, SMALL)
    assert pred["breakdown"]["t_dp_comm_exposed_s"] > 0
    assert pred["breakdown"]["t_dp_comm_hidden_s"] == 0


def test_missing_profile_is_named(tmp_path: Path, hardware_profile: Callable[..., Path]) -> None:
    with pytest.raises(ValueError, match="no hardware profile for 2 rank"):
        run_local_check({1: hardware_profile(1)}, SMALL, layouts={"TP=2 gloo": (2, 1)})


@pytest.mark.integration
def test_tp2_and_dp2_run_on_gloo(tmp_path: Path, hardware_profile: Callable[..., Path]) -> None:
    rows = run_local_check(
        {2: hardware_profile(2)}, SMALL, layouts={"DP=2 gloo": (1, 2), "TP=2 gloo": (2, 1)}
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

    rows = run_local_check(profile_for, SMALL, layouts={"1 rank": (1, 1)})
    assert calls == [1] and rows[0]["predicted_step_s"] > 0


def test_contended_layout_is_timed_again_and_every_attempt_kept(
    tmp_path: Path, hardware_profile: Callable[..., Path]
) -> None:
    # max_other_load 0 treats any other process as contention: both attempts are used
    rows = run_local_check(
        {1: hardware_profile(1)},
        SMALL,
        layouts={"1 rank": (1, 1)},
        max_other_load=0.0,
        attempts=2,
    )
    tries = rows[0]["attempts"]
    assert 1 <= len(tries) <= 2 and all(t["measured_step_s"] > 0 for t in tries)
    assert rows[0]["measured_step_s"] == tries[-1]["measured_step_s"]
    assert 0.0 <= rows[0]["other_load"] <= 1.0
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        run_local_check({1: hardware_profile(1)}, SMALL, attempts=0)
