"""``estimate(model, cluster, strategy) -> Estimate``: one layout, priced and explained."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from step_infra.emulator.costmodel import evaluate
from step_infra.emulator.counts import training_flops_per_sample
from step_infra.emulator.specs import ClusterSpec, ModelSpec
from step_infra.emulator.strategy import Strategy, _numeric


@dataclass(frozen=True, slots=True, kw_only=True)
class Estimate:
    """Predicted step of one layout. ``tflops_per_gpu`` counts model FLOPs (Megatron
    convention, no recompute); ``mfu`` is that over the peak of the precision used."""

    strategy: Strategy
    step_time_s: float
    tflops_per_gpu: float
    mfu: float
    memory_gb_per_gpu: float
    fits: bool
    samples_per_s: float
    breakdown: dict[str, float]

    def summary(self) -> str:
        return (
            f"step {self.step_time_s:.3f} s, {self.tflops_per_gpu:.0f} TFLOP/s/GPU "
            f"(MFU {self.mfu:.1%}), {self.memory_gb_per_gpu:.1f} GB/GPU "
            f"({'fits' if self.fits else 'does NOT fit'})"
        )


def model_flops_per_step(model: ModelSpec, global_batch: np.ndarray | int) -> np.ndarray:
    """Model FLOPs of one step: ``global_batch`` samples x training FLOPs per sample."""
    return np.asarray(global_batch, dtype=float) * training_flops_per_sample(model)


def throughput_columns(
    model: ModelSpec, cluster: ClusterSpec, c: dict[str, np.ndarray], priced: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """TFLOP/s per GPU, MFU and samples/s from a priced step (shared with ``search``)."""
    step = priced["step_time_s"]
    tflops = model_flops_per_step(model, c["gb"]) / step / cluster.num_gpus / 1e12
    peak = np.where(c["fp8"] == 1, cluster.gpu.peak_tflops_fp8, cluster.gpu.peak_tflops_bf16)
    return {"tflops_per_gpu": tflops, "mfu": tflops / peak, "samples_per_s": c["gb"] / step}


def estimate(model: ModelSpec, cluster: ClusterSpec, strategy: Strategy) -> Estimate:
    """Price one layout; raises ``ValueError`` naming the rule an invalid layout breaks."""
    s = strategy.validate(model, cluster)
    c = {k: np.array([v]) for k, v in _numeric(s).items()}
    priced = evaluate(model, cluster, c)
    rates = throughput_columns(model, cluster, c, priced)
    breakdown = {
        k: float(v[0])
        for k, v in priced.items()
        if k.startswith(("t_", "mem_")) or k == "micro_batches"
    }
    return Estimate(
        strategy=s,
        step_time_s=float(priced["step_time_s"][0]),
        tflops_per_gpu=float(rates["tflops_per_gpu"][0]),
        mfu=float(rates["mfu"][0]),
        memory_gb_per_gpu=float(priced["memory_gb_per_gpu"][0]),
        fits=bool(priced["fits"][0]),
        samples_per_s=float(rates["samples_per_s"][0]),
        breakdown=breakdown,
    )
