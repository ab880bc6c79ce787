"""predict_step: a measured hardware profile and a local layout wired into estimate."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from step_infra.emulator import ClusterSpec, Strategy, estimate, get_model, predict_step
from step_infra.emulator.hwprobe import build_profile


def _profile(tmp_path: Path, ranks: int) -> Path:
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
        "gloo": {"busbw_gb_s": 1.0, "latency_us": 40.0},
    }
    path = tmp_path / f"hw{ranks}.json"
    path.write_text(json.dumps(build_profile(meas, name="unit-cpu", ranks_per_node=ranks)))
    return path


def test_predict_step_is_estimate_on_the_profile(tmp_path: Path) -> None:
    """predict_step wires a profile and a layout into estimate: same numbers as by hand."""
    path = _profile(tmp_path, 4)
    got = predict_step(
        "micro-dit", path, tp=2, dp=2, nodes=2, micro_batch=2, global_batch=8, seq_len=96
    )
    cluster = dataclasses.replace(ClusterSpec.from_profile(path, nodes=2), gpus_per_node=2)
    model = dataclasses.replace(get_model("micro-dit"), seq_len=96)
    strategy = Strategy(tp=2, dp=2, micro_batch=2, global_batch=8, distributed_optimizer=False)
    assert got.step_time_s == pytest.approx(estimate(model, cluster, strategy).step_time_s)
    assert got.breakdown["t_tp_comm_exposed_s"] > 0
    with pytest.raises(ValueError, match=r"4 ranks .* do not spread evenly over nodes=3"):
        predict_step("tiny-dit", path, tp=2, dp=2, nodes=3, micro_batch=1, global_batch=2)
