"""Encoder/trainer GPU split: hand-computed cases; plans whose layout fills the trainer GPUs."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from step_infra.emulator import cluster_for, get_model
from step_infra.emulator.allocation import (
    allocate_gpus,
    allocation_table,
    encoder_samples_per_s_per_gpu,
    min_encoder_gpus,
    split_for_trainers,
)
from step_infra.emulator.planner import make_plan, write_plan


def test_linear_trainers_largest_fed_size() -> None:
    # 1 sample/s per trainer GPU; VAE 10/s/GPU, text 40/s/GPU, 100 GPUs.
    # n=88 needs ceil(8.8)=9 VAE + ceil(2.2)=3 text = 100 GPUs; n=89 would need 101.
    a = allocate_gpus(
        100, trainer_samples_per_s=1.0, vae_samples_per_s_per_gpu=10, text_samples_per_s_per_gpu=40
    )
    assert (a.trainer_gpus, a.vae_gpus, a.text_gpus, a.spare_gpus) == (88, 9, 3, 0)
    assert a.training_samples_per_s == pytest.approx(88.0)
    assert not a.stalls
    assert a.headroom == pytest.approx(min(90, 120) / 88 - 1)


def test_starved_rows_split_leftover_by_rate() -> None:
    t = allocation_table(
        100, trainer_samples_per_s=1.0, vae_samples_per_s_per_gpu=10, text_samples_per_s_per_gpu=40
    ).set_index("trainer_gpus")
    row = t.loc[95]  # 5 GPUs left: 4 VAE (40/s) + 1 text (40/s) feed only 40 of the 95 samples/s
    assert not row["feasible"]
    assert (row["vae_gpus"], row["text_gpus"]) == (4, 1)
    assert row["training_samples_per_s"] == pytest.approx(40.0)
    assert t.loc[88, "feasible"] and not t.loc[89, "feasible"]


def test_saturating_trainers_prefer_fewer_gpus() -> None:
    def rate(n: np.ndarray) -> np.ndarray:
        return np.minimum(n, 50).astype(float)  # stops scaling at 50 GPUs

    a = allocate_gpus(
        100, trainer_samples_per_s=rate, vae_samples_per_s_per_gpu=10, text_samples_per_s_per_gpu=40
    )
    assert a.trainer_gpus == 50
    # 50 - 5 - 2 = 43 spare GPUs go to the encoders, always to the one with less supply.
    assert a.vae_gpus + a.text_gpus == 50
    assert abs(a.vae_gpus * 10 - a.text_gpus * 40) <= 40


def test_trainer_unit_and_spare_to_encoders() -> None:
    a = allocate_gpus(
        24,
        trainer_samples_per_s=1.0,
        vae_samples_per_s_per_gpu=10,
        text_samples_per_s_per_gpu=10,
        trainer_unit=8,
    )
    assert a.trainer_gpus == 16
    assert (a.vae_gpus, a.text_gpus, a.spare_gpus) == (4, 4, 0)
    assert a.headroom == pytest.approx(40 / 16 - 1)


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="no split of 4 GPUs"):
        allocate_gpus(
            4,
            trainer_samples_per_s=100.0,
            vae_samples_per_s_per_gpu=1,
            text_samples_per_s_per_gpu=1,
        )
    with pytest.raises(ValueError, match="encoder rates must be > 0"):
        allocation_table(
            8, trainer_samples_per_s=1.0, vae_samples_per_s_per_gpu=0, text_samples_per_s_per_gpu=1
        )
    with pytest.raises(ValueError, match="one rate per size"):
        allocation_table(
            8,
            trainer_samples_per_s=lambda n: np.ones(3),
            vae_samples_per_s_per_gpu=1,
            text_samples_per_s_per_gpu=1,
        )


def test_rate_helpers() -> None:
    # 1 PFLOP a sample on a 1000 TFLOP/s GPU at 50 %: 0.5 samples/s.
    assert encoder_samples_per_s_per_gpu(1e15, peak_tflops=1000, efficiency=0.5) == pytest.approx(
        0.5
    )
    assert min_encoder_gpus(10.0, 2.5) == 4
    assert min_encoder_gpus(10.1, 2.5) == 5


@pytest.mark.parametrize(
    ("model", "gpus", "global_batch", "vae_rate", "text_rate"),
    [
        ("stepvideo-t2v-30b", 2048, 256, 0.5, 50.0),
        ("stepvideo-t2v-30b", 2048, 256, 0.02, 50.0),
        ("stepvideo-t2v-30b", 512, 960, 0.5, 50.0),
        ("tiny-dit", 8, 12, 1e5, 1e5),  # one node: trainers take part of it
    ],
)
def test_plan_layout_fills_exactly_the_trainer_gpus(
    tmp_path: Path, model: str, gpus: int, global_batch: int, vae_rate: float, text_rate: float
) -> None:
    """The layout is searched on the GPUs the encoder split leaves: tp*pp*cp*dp in the plan
    TOML is the [allocation] trainer count, and the encoders keep up with that layout."""
    plan = make_plan(
        get_model(model),
        cluster_for("h100-sxm", gpus),
        global_batch=global_batch,
        vae_rate=vae_rate,
        text_rate=text_rate,
    )
    a = plan.allocation
    assert a is not None, plan.allocation_note
    s = plan.chosen.strategy
    assert s.dp is not None and s.tp * s.pp * s.cp * s.dp == a.trainer_gpus
    assert plan.trainer_cluster.num_gpus == a.trainer_gpus
    assert a.trainer_gpus + a.vae_gpus + a.text_gpus == gpus and not a.stalls
    assert a.trainer_samples_per_s == pytest.approx(plan.chosen.samples_per_s)
    if gpus > 8:
        assert a.trainer_gpus % 8 == 0  # trainers on whole nodes
    toml = tomllib.loads(write_plan(plan, tmp_path / "plan.toml").read_text())
    st, alloc = toml["strategy"], toml["allocation"]
    assert st["tp"] * st["pp"] * st["cp"] * st["dp"] == alloc["trainer_gpus"]
    assert alloc["trainer_gpus"] + alloc["vae_gpus"] + alloc["text_gpus"] == gpus


def test_split_for_trainers_sizes_encoders_and_names_shortfall() -> None:
    a = split_for_trainers(
        100,
        80,
        trainer_samples_per_s=40.0,
        vae_samples_per_s_per_gpu=4,
        text_samples_per_s_per_gpu=40,
    )
    # 10 VAE + 1 text feed 40 samples/s; the 9 left over go to the encoders
    assert (a.trainer_gpus, a.vae_gpus + a.text_gpus, a.spare_gpus) == (80, 20, 0)
    assert not a.stalls
    with pytest.raises(ValueError, match="need 20 VAE \\+ 1 text-encoder GPUs, more than the 10"):
        split_for_trainers(
            100,
            90,
            trainer_samples_per_s=80.0,
            vae_samples_per_s_per_gpu=4,
            text_samples_per_s_per_gpu=80,
        )
