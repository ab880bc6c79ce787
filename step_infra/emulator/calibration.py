"""Published runs (shared/calibration) as emulator inputs, and the fit of the GPU efficiencies.

Each CSV row becomes (model, cluster, strategy, published throughput in model TFLOP/s per GPU).
Conventions are converted here, once: Narayanan et al. 2021 count hardware FLOPs with full
recomputation (``megatron-96``), so their figure is scaled by the ratio of the model-FLOP to
the hardware-FLOP formula; the Megatron-Bridge rows are compared on tokens/s per GPU.

Assumptions where the sources are silent (also in the validation report): micro-batch 1
everywhere; the 2021 rows use the interleaved schedule (vpp=2) where pp > 1 and the layer
count allows, no distributed optimizer (it did not exist yet), no TP-communication overlap;
the 2024 and Bridge rows use sequence parallel, the distributed optimizer and overlapped
TP/DP communication, as Megatron-Core's performance recipes do.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from step_infra.emulator.estimate import estimate
from step_infra.emulator.presets import NIC_GB_S, get_gpu
from step_infra.emulator.specs import ClusterSpec, GPUSpec, ModelSpec
from step_infra.emulator.strategy import Strategy

FIT_FIELDS = ("gemm_eff_max", "gemm_half_dim", "attn_eff", "fp8_gemm_eff_max", "comm_eff")


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibrationRow:
    source: str
    name: str
    model: ModelSpec
    cluster: ClusterSpec
    strategy: Strategy
    published_tflops_per_gpu: float
    published_tokens_per_s_per_gpu: float | None = None


def default_calibration_dir() -> Path:
    """``$STEP_INFRA_CALIBRATION_DIR``, else shared/calibration beside the project root."""
    env = os.environ.get("STEP_INFRA_CALIBRATION_DIR")
    if env:
        if not Path(env).is_dir():
            raise FileNotFoundError(f"STEP_INFRA_CALIBRATION_DIR={env} is not a directory")
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        for candidate in (
            parent / "shared" / "calibration",
            parent.parent / "shared" / "calibration",
        ):
            if candidate.is_dir():
                return candidate
    raise FileNotFoundError(
        "shared/calibration not found beside the project; set STEP_INFRA_CALIBRATION_DIR to its path"
    )


def _megatron96_to_model(published: float, m: ModelSpec) -> float:
    """Narayanan et al. eq. 3 counts ``96 B s l h^2 (1 + s/6h + V/16lh)``; model FLOPs are
    ``72 B s l h^2 (1 + s/6h + V/12lh)`` (the logits are not recomputed)."""
    s, h, layers, v = m.seq_len, m.hidden, m.layers, m.vocab
    hardware = 96 * (1 + s / (6 * h) + v / (16 * layers * h))
    model = 72 * (1 + s / (6 * h) + v / (12 * layers * h))
    return published * model / hardware


def _cluster(row: dict[str, str]) -> ClusterSpec:
    gpu = get_gpu(row["gpu"])
    return ClusterSpec.for_gpus(
        gpu,
        int(row["num_gpus"]),
        gpus_per_node=int(row["gpus_per_node"]),
        nic_gb_s=NIC_GB_S[gpu.name],
    )


def _lm_spec(r: dict[str, str], name: str, **extra: object) -> ModelSpec:
    """The columns every calibration CSV shares, plus what that source adds."""
    return ModelSpec(
        name=name,
        layers=int(r["layers"]),
        hidden=int(r["hidden"]),
        heads=int(r["heads"]),
        vocab=int(r["vocab"]),
        seq_len=int(r["seq_len"]),
        **extra,  # type: ignore[arg-type]
    )


def load_rows(directory: str | Path | None = None) -> list[CalibrationRow]:
    """Every row of the three calibration CSVs as emulator inputs."""
    d = Path(directory) if directory is not None else default_calibration_dir()
    rows: list[CalibrationRow] = []
    for r in csv.DictReader((d / "megatron_2021_weak_scaling.csv").open()):
        m = _lm_spec(r, r["model"], learned_positions=True)
        pp = int(r["pp"])
        vpp = 2 if pp > 1 and m.layers % (2 * pp) == 0 else 1
        st = Strategy(
            tp=int(r["tp"]),
            pp=pp,
            vpp=vpp,
            global_batch=int(r["global_batch"]),
            recompute="full",
            distributed_optimizer=False,
            overlap_tp_comm=False,
        )
        rows.append(
            CalibrationRow(
                source="megatron-2021",
                name=r["model"],
                model=m,
                cluster=_cluster(r),
                strategy=st,
                published_tflops_per_gpu=_megatron96_to_model(
                    float(r["published_tflops_per_gpu"]), m
                ),
            )
        )
    for r in csv.DictReader((d / "megatron_2024_h100_weak_scaling.csv").open()):
        m = _lm_spec(r, r["model"] + "-2024", tied_embeddings=False)
        tp = int(r["tp"])
        st = Strategy(
            tp=tp,
            pp=int(r["pp"]),
            global_batch=int(r["global_batch"]),
            sequence_parallel=tp > 1,
            overlap_tp_comm=True,
        )
        rows.append(
            CalibrationRow(
                source="megatron-2024",
                name=m.name,
                model=m,
                cluster=_cluster(r),
                strategy=st,
                published_tflops_per_gpu=float(r["published_tflops_per_gpu"]),
            )
        )
    for r in csv.DictReader((d / "megatron_bridge_h100_fp8.csv").open()):
        m = _lm_spec(
            r,
            r["model"],
            kv_heads=int(r["kv_heads"]),
            ffn=int(r["ffn_hidden"]),
            gated_mlp=True,
            tied_embeddings=False,
        )
        tp = int(r["tp"])
        st = Strategy(
            tp=tp,
            pp=int(r["pp"]),
            vpp=int(r["vpp"]),
            cp=int(r["cp"]),
            micro_batch=int(r["micro_batch"]),
            global_batch=int(r["global_batch"]),
            sequence_parallel=tp > 1,
            overlap_tp_comm=True,
            precision="fp8",
        )
        rows.append(
            CalibrationRow(
                source="megatron-bridge-fp8",
                name=r["model"],
                model=m,
                cluster=_cluster(r),
                strategy=st,
                published_tflops_per_gpu=float(r["published_tflops_per_gpu"]),
                published_tokens_per_s_per_gpu=float(r["published_tokens_per_s_per_gpu"]),
            )
        )
    return rows


def row_error(row: CalibrationRow, gpu: GPUSpec | None = None) -> tuple[float, dict[str, float]]:
    """(relative error of predicted throughput, the estimate's breakdown). Bridge rows compare
    tokens/s per GPU (convention-free); the others model TFLOP/s per GPU."""
    cluster = row.cluster if gpu is None else dataclasses.replace(row.cluster, gpu=gpu)
    est = estimate(row.model, cluster, row.strategy)
    if row.published_tokens_per_s_per_gpu is not None:
        tokens = row.strategy.global_batch * row.model.seq_len / est.step_time_s / cluster.num_gpus
        return tokens / row.published_tokens_per_s_per_gpu - 1.0, est.breakdown
    return est.tflops_per_gpu / row.published_tflops_per_gpu - 1.0, est.breakdown


# Physical bounds of each fitted efficiency: a fit that leaves them is tuned to rows, not physics.
FIT_BOUNDS = {
    "gemm_eff_max": (0.5, 0.9),
    "gemm_half_dim": (16.0, 1024.0),
    "attn_eff": (0.3, 0.8),
    "fp8_gemm_eff_max": (0.3, 0.8),
    "comm_eff": (0.5, 0.9),
}


def fit(rows: list[CalibrationRow]) -> dict[str, dict[str, float]]:
    """Fit the few efficiencies per GPU type (shared by every row of that type, inside
    ``FIT_BOUNDS``) by minimizing the mean absolute percentage error with Nelder-Mead.
    ``fp8_gemm_eff_max`` is fitted only where fp8 rows exist. Returns {gpu: fitted fields}."""
    from scipy.optimize import minimize

    fitted: dict[str, dict[str, float]] = {}
    for gpu_name in sorted({r.cluster.gpu.name for r in rows}):
        group = [r for r in rows if r.cluster.gpu.name == gpu_name]
        base = group[0].cluster.gpu
        names = [
            f
            for f in FIT_FIELDS
            if f != "fp8_gemm_eff_max" or any(r.strategy.precision == "fp8" for r in group)
        ]
        x0 = np.array([getattr(base, f) for f in names])

        def loss(
            x: np.ndarray,
            group: list[CalibrationRow] = group,
            base: GPUSpec = base,
            names: list[str] = names,
        ) -> float:
            if any(
                not FIT_BOUNDS[n][0] <= v <= FIT_BOUNDS[n][1] for n, v in zip(names, x, strict=True)
            ):
                return 1e9
            gpu = dataclasses.replace(base, **dict(zip(names, map(float, x), strict=True)))  # type: ignore[arg-type]
            return float(np.mean([abs(row_error(r, gpu)[0]) for r in group]))

        best = minimize(
            loss, x0, method="Nelder-Mead", options={"maxiter": 600, "xatol": 1e-3, "fatol": 1e-5}
        )
        fitted[gpu_name] = {f: round(float(v), 4) for f, v in zip(names, best.x, strict=True)}
    return fitted
