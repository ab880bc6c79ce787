"""Local prediction check: the real tiny DiT trains, the same step is priced, layouts run on gloo."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from step_infra.emulator.hwprobe import build_profile
from step_infra.train.emulator_check import (
    CheckConfig,
    latent_grid,
    measure_layout,
    predict_layout,
    run_local_check,
)

SMALL = CheckConfig(batch=2, seq_len=32, steps=2, warmup=1, timeout_s=90)


def _profile(tmp_path: Path, ranks: int, *, overlap: float = 0.0) -> Path:
    meas = {
        "when": "2026-01-01T00:00:00Z",
        "host": "test",
        "matmul": [
            {"tokens": 1024, "dim": d, "tflops": 0.05 / (1 + 50 / d + 50 / 1024)}
            for d in (64, 128, 256, 512)
        ],
        "attention": [{"seq": s, "head_dim": 32, "tflops": 0.02} for s in (128, 512)],
        "memory_gb_s": 20.0,
        "memory_gb": 16.0,
        "loopback": {"gb_s": 3.0, "latency_us": 10.0},
        "gloo": {"busbw_gb_s": 1.0, "latency_us": 40.0, "overlap": overlap},
    }
    path = tmp_path / f"hw{ranks}.json"
    path.write_text(json.dumps(build_profile(meas, name="unit-cpu", ranks_per_node=ranks)))
    return path


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


def test_single_rank_step_is_measured_and_priced(tmp_path: Path) -> None:
    measured = measure_layout(1, 1, SMALL)
    assert 0 < measured < 30
    pred = predict_layout(_profile(tmp_path, 1), 1, 1, SMALL)
    assert pred["step_time_s"] > 0
    # Doubling the batch doubles the matmul work of the step (taller GEMMs run a bit faster,
    # so the time grows less than 2x) but not the ops the host dispatches per micro-batch.
    bigger = predict_layout(_profile(tmp_path, 1), 1, 1, CheckConfig(batch=4, seq_len=32))
    small, big = pred["breakdown"], bigger["breakdown"]
    assert big["t_compute_dense_s"] > 1.5 * small["t_compute_dense_s"]
    assert big["t_dispatch_exposed_s"] == pytest.approx(small["t_dispatch_exposed_s"])
    assert small["t_dispatch_exposed_s"] > 0  # a CPU profile: every op pays its dispatch
    assert bigger["step_time_s"] > pred["step_time_s"]


def test_tp2_prediction_has_tp_communication(tmp_path: Path) -> None:
    pred = predict_layout(_profile(tmp_path, 2), 2, 1, SMALL)
    tp_comm = pred["breakdown"].get("t_tp_comm_exposed_s", 0.0) + pred["breakdown"].get(
        "t_tp_comm_hidden_s", 0.0
    )
    assert tp_comm > 0


def test_dp2_prediction_reduces_gradients_after_the_backward(tmp_path: Path) -> None:
    # finalize_grads all-reduces once the backward is done: nothing of it is hidden, even on
    # a machine whose collectives could hide under compute
    pred = predict_layout(_profile(tmp_path, 2, overlap=0.9), 1, 2, SMALL)
    assert pred["breakdown"]["t_dp_comm_exposed_s"] > 0
    assert pred["breakdown"]["t_dp_comm_hidden_s"] == 0


def test_missing_profile_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no hardware profile for 2 rank"):
        run_local_check({1: _profile(tmp_path, 1)}, SMALL, layouts={"TP=2 gloo": (2, 1)})


@pytest.mark.integration
def test_tp2_and_dp2_run_on_gloo(tmp_path: Path) -> None:
    rows = run_local_check(
        {2: _profile(tmp_path, 2)}, SMALL, layouts={"DP=2 gloo": (1, 2), "TP=2 gloo": (2, 1)}
    )
    assert [r["layout"] for r in rows] == ["DP=2 gloo", "TP=2 gloo"]
    for r in rows:
        assert r["measured_step_s"] > 0 and math.isfinite(r["error"])


def test_profile_callable_is_called_per_layout(tmp_path: Path) -> None:
    calls: list[int] = []

    def profile_for(ranks: int) -> Path:
        calls.append(ranks)
        return _profile(tmp_path, ranks)

    rows = run_local_check(profile_for, SMALL, layouts={"1 rank": (1, 1)})
    assert calls == [1] and rows[0]["predicted_step_s"] > 0


def test_contended_layout_is_timed_again_and_every_attempt_kept(tmp_path: Path) -> None:
    # max_other_load 0 treats any other process as contention: both attempts are used
    rows = run_local_check(
        {1: _profile(tmp_path, 1)},
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
        run_local_check({1: _profile(tmp_path, 1)}, SMALL, attempts=0)
