"""Hardware probe: the curve fit recovers known parameters, profiles load into ClusterSpec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from step_infra.emulator.hwprobe import (
    ProbeConfig,
    attention_efficiency,
    build_profile,
    calibrate,
    fit_gemm_curve,
    measure_gloo_allreduce,
    measure_loopback,
)
from step_infra.emulator.specs import ClusterSpec


def _curve(d: float, t: float, rate_max: float = 2.0, half: float = 100.0) -> float:
    return rate_max / (1 + half / d + half / t)


def _measurements() -> dict:
    return {
        "when": "2026-01-01T00:00:00Z",
        "host": "test",
        "matmul": [
            {"tokens": 2048, "dim": d, "tflops": _curve(d, 2048)} for d in (64, 128, 256, 512, 1024)
        ],
        # attn_eff 0.25 of the 2.0 peak at head_dim 32: rate = 0.5 / (1 + 128/s + 1)
        "attention": [
            {"seq": s, "head_dim": 32, "tflops": 0.5 / (2 + 128 / s)} for s in (128, 512, 1024)
        ],
        "memory_gb_s": 30.0,
        "memory_gb": 16.0,
        "loopback": {"gb_s": 4.0, "latency_us": 10.0},
        "gloo": {"busbw_gb_s": 1.0, "latency_us": 40.0},
    }


def test_fit_recovers_known_curve() -> None:
    rows = _measurements()["matmul"]
    rate_max, half = fit_gemm_curve(rows)
    assert rate_max == pytest.approx(2.0, rel=1e-3)
    assert half == pytest.approx(100.0, rel=1e-3)
    assert attention_efficiency(_measurements()["attention"], 2.0) == pytest.approx(0.25)


def test_profile_loads_into_cluster_spec(tmp_path: Path) -> None:
    profile = build_profile(_measurements(), name="unit-cpu", ranks_per_node=2)
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(profile))
    cluster = ClusterSpec.from_profile(path)
    g = cluster.gpu
    assert g.name == "unit-cpu"
    assert g.peak_tflops_bf16 == pytest.approx(2.0, rel=1e-3)
    assert g.hbm_gb_s == 30.0 and g.nvlink_gb_s == 4.0
    # no overlap measured: a CPU's cores both compute and copy, so nothing hides
    assert g.comm_overlap == 0.0
    meas = _measurements()
    meas["gloo"]["overlap"] = 0.25
    assert build_profile(meas, name="unit-cpu")["gpu"]["comm_overlap"] == 0.25
    assert g.comm_eff == pytest.approx(0.25)  # gloo 1.0 GB/s over 4.0 GB/s raw loopback
    assert cluster.gpus_per_node == 2
    assert cluster.nvlink_latency_us == 40.0


def test_loopback_measures_positive_rates() -> None:
    res = measure_loopback(ProbeConfig(loopback_mb=4))
    assert res["gb_s"] > 0.01
    assert 0 < res["latency_us"] < 100_000


def test_quick_probe_writes_loadable_profile(tmp_path: Path) -> None:
    cfg = ProbeConfig(
        gemm_dims=(32, 64, 128),
        gemm_tokens=256,
        attn_seqs=(64, 128),
        copy_mb=8,
        loopback_mb=4,
        repeats=2,
        min_time_s=0.005,
        gloo=False,
    )
    profile = calibrate(tmp_path / "p.json", cfg=cfg)
    assert len(profile["measurements"]["matmul"]) == 3
    cluster = ClusterSpec.from_profile(tmp_path / "p.json")
    assert cluster.gpu.peak_tflops_bf16 > 0
    assert cluster.gpu.hbm_gb_s > 0


@pytest.mark.integration
def test_gloo_allreduce_two_processes() -> None:
    res = measure_gloo_allreduce(ProbeConfig(loopback_mb=2), timeout_s=90, reps=4)
    assert res["busbw_gb_s"] > 0.001
    assert res["latency_us"] > 0 and res["hot_latency_us"] > 0
    assert 0.0 <= res["overlap"] <= 1.0
    assert sorted(res["in_context_s"], key=int) == ["65536", "1048576", str(2 * 2**20)]


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        ProbeConfig(repeats=0)


@pytest.mark.integration
def test_concurrent_ranks_measure_every_shape() -> None:
    from step_infra.emulator.hwprobe import measure_compute_concurrent

    cfg = ProbeConfig(
        gemm_dims=(32, 64),
        gemm_tokens=128,
        attn_seqs=(64,),
        repeats=1,
        min_time_s=0.005,
        concurrent_ranks=2,
    )
    res = measure_compute_concurrent(cfg, timeout_s=90)
    assert [r["dim"] for r in res["matmul"]] == [32, 64]
    assert all(r["tflops"] > 0 for r in res["matmul"] + res["attention"])
    with pytest.raises(ValueError, match="concurrent_ranks must be >= 1"):
        ProbeConfig(concurrent_ranks=0)


def test_op_overhead_is_measured_and_lands_in_the_profile() -> None:
    import torch

    from step_infra.emulator.hwprobe import measure_op_overhead_us

    # One intra-op thread: with torch's default pool (one thread a core), every op ends in a
    # barrier that, beside two CPU hogs on 2 cores, waits for a scheduler slice: 660 us an op
    # where a quiet machine reads 5. That is the pool's wait, not the dispatch cost measured.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        us = measure_op_overhead_us(ProbeConfig(repeats=3, min_time_s=0.01))
    finally:
        torch.set_num_threads(threads)
    assert 0.05 < us < 500  # host microseconds per aten op: a few on any machine
    meas = _measurements()
    assert "op_overhead_us" not in build_profile(meas, name="old")["gpu"]  # keeps the default
    meas["op_overhead_us"] = us
    gpu = build_profile(meas, name="unit-cpu")["gpu"]
    assert gpu["op_overhead_us"] == us
    assert gpu["async_dispatch"] is False  # the probe's torch ran on the CPU


def test_profile_reproduces_the_measured_rates_through_the_time_model(tmp_path: Path) -> None:
    """The probe fits the time model's own curves (costmodel.gemm_fill, attention_fill): priced
    on the profile, every measured shape comes back at its measured rate."""
    import numpy as np

    from step_infra.emulator.costmodel import attention_rate, gemm_rate

    meas = _measurements()
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(build_profile(meas, name="unit-cpu")))
    cluster = ClusterSpec.from_profile(path)
    for r in meas["matmul"]:
        rate = gemm_rate(cluster, np.array([0]), np.array([r["dim"]]), np.array([r["tokens"]]))
        assert rate[0] / 1e12 == pytest.approx(r["tflops"], rel=1e-3)
    for r in meas["attention"]:
        rate = attention_rate(cluster, np.array([float(r["seq"])]), r["head_dim"])
        assert rate[0] / 1e12 == pytest.approx(r["tflops"], rel=1e-3)


def test_calibrate_gpu_fits_the_preset_to_rates_measured_on_the_probe_device() -> None:
    """On a GPU it runs on CUDA in bf16 (``gpu_probe_config``); here the same code measures
    the CPU, which is far below any datasheet: the fitted efficiencies must say so."""
    from step_infra.emulator.hwprobe import ProbeConfig, calibrate_gpu
    from step_infra.emulator.presets import get_gpu

    preset = get_gpu("h100-sxm")
    cfg = ProbeConfig(gemm_dims=(32, 64, 128), gemm_tokens=256, attn_seqs=(64, 128),
                      attn_heads=2, head_dim=32, repeats=2, min_time_s=0.01, gloo=False)  # fmt: skip
    fitted, rows = calibrate_gpu(preset, cfg)
    assert len(rows["gemm"]) == 3 and len(rows["attention"]) == 2
    assert 0 < fitted.gemm_eff_max < 0.05 and 0 < fitted.attn_eff < 0.05  # a CPU, not an H100
    assert fitted.peak_tflops_bf16 == preset.peak_tflops_bf16 and "fitted on cpu" in fitted.source
    top = max(r["tflops"] for r in rows["gemm"])
    assert fitted.gemm_eff_max * preset.peak_tflops_bf16 >= 0.5 * top  # the asymptote of the fit
