"""predict_step: a measured hardware profile and a local layout wired into estimate."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from step_infra.emulator import ClusterSpec, Strategy, estimate, get_model, predict_step


def test_predict_step_is_estimate_on_the_profile(
    tmp_path: Path, hardware_profile: Callable[..., Path]
) -> None:
    """predict_step wires a profile and a layout into estimate: same numbers as by hand."""
    path = hardware_profile(4)
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
