"""Measure this machine (matmul, attention, memory, loopback and gloo) into a hardware profile.

Predictions for a local job are only real predictions if the rates in ``ClusterSpec`` are this
machine's, not a datasheet's. The probe times, with torch on the default device (CPU here, a
GPU where there is one):

- training GEMM triples (forward and both backward products) of several shapes -> the peak
  (asymptote) and ``gemm_half_dim`` of the time model's achievable-rate curve;
- fused attention (``scaled_dot_product_attention``, forward + backward) at several sequence
  lengths -> ``attn_eff``;
- a large tensor copy and a chain of elementwise kernels -> memory bandwidth (``hbm_gb_s``);
- the forward + backward of a block of tensors too small to compute anything -> host time per
  framework op (``op_overhead_us``; a CPU runs each op itself, so ``async_dispatch`` is off);
- TCP loopback between two threads -> link bandwidth and latency, and optionally two-process
  gloo all-reduces timed as a training step issues them (right after compute, mean of many)
  -> the fraction of that bandwidth a real collective reaches (``comm_eff``), its per-hop
  latency, and how much of it hides under concurrent compute (``comm_overlap``).

The profile is JSON with ``gpu`` and ``cluster`` tables whose keys are the fields of
``GPUSpec``/``ClusterSpec`` (only the fields those classes have are written, so the profile
keeps loading if they grow), plus the raw ``measurements``. Load it with
``ClusterSpec.from_profile(path)``. Each figure is a median of repeats: the machine is shared.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from step_infra.emulator.costmodel import (
    ATTN_BACKWARD_FACTOR,
    GEMM_BACKWARD_FACTOR,
    attention_fill,
    gemm_fill,
    ring_allreduce_terms,
)
from step_infra.emulator.specs import GPUSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeConfig:
    """What to measure and for how long (``quick`` keeps the whole probe well under 60 s)."""

    gemm_dims: tuple[int, ...] = (64, 128, 256, 512, 1024)
    gemm_tokens: int = 2048
    attn_seqs: tuple[int, ...] = (128, 512, 1024)
    attn_heads: int = 4
    head_dim: int = 32
    copy_mb: int = 256
    loopback_mb: int = 64
    repeats: int = 5
    min_time_s: float = 0.05
    gloo: bool = True
    gloo_reps: int = 100  # all-reduces per size: their mean is what a step's sum sees
    threads: int | None = None
    concurrent_ranks: int = 1
    # where the GEMM and attention probes run: "cpu", or "cuda" (``calibrate_gpu``), and in
    # which dtype ("float32" on a CPU; "bfloat16" as a GPU trains)
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.min_time_s <= 0:
            raise ValueError(
                f"repeats must be >= 1 and min_time_s > 0, got {self.repeats}, {self.min_time_s}"
            )
        if self.concurrent_ranks < 1:
            raise ValueError(f"concurrent_ranks must be >= 1, got {self.concurrent_ranks}")
        if not self.gemm_dims or min(self.gemm_dims) < 1:
            raise ValueError(f"gemm_dims must be positive sizes, got {self.gemm_dims}")


def quick_config(*, gloo: bool = True, threads: int | None = None) -> ProbeConfig:
    """Smaller sizes and fewer repeats: a few seconds of measurement."""
    return ProbeConfig(
        gemm_dims=(64, 128, 256, 512),
        gemm_tokens=1024,
        attn_seqs=(128, 512),
        copy_mb=128,
        loopback_mb=32,
        repeats=3,
        min_time_s=0.03,
        gloo=gloo,
        gloo_reps=40,
        threads=threads,
    )


def _time_calls(
    fns: list[Callable[[], object]],
    *,
    repeats: int,
    min_time_s: float,
    sync: Callable[[], object] | None = None,
) -> list[float]:
    """Median seconds per call of each function. Repeats go round-robin over the functions
    (each repeat runs a call enough times to last ``min_time_s``), so a burst of someone
    else's load on a shared machine spoils one round of every shape, not every repeat of one.
    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before and after each timed run, so
    a device's queued work is inside the time."""
    wait = sync or (lambda: None)
    inner = []
    for fn in fns:
        fn()  # warm up (allocations, kernel selection)
        wait()
        t0 = time.perf_counter()
        fn()
        wait()
        inner.append(max(1, math.ceil(min_time_s / max(time.perf_counter() - t0, 1e-7))))
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, n, out in zip(fns, inner, samples, strict=True):
            wait()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            wait()
            out.append((time.perf_counter() - t0) / n)
    return [statistics.median(out) for out in samples]


def _placement(cfg: ProbeConfig) -> tuple[dict[str, Any], Callable[[], object] | None]:
    """Tensor keywords for the probe's device and dtype, and the device's synchronize."""
    import torch

    kw = {"device": torch.device(cfg.device), "dtype": getattr(torch, cfg.dtype)}
    return kw, (torch.cuda.synchronize if kw["device"].type == "cuda" else None)


def _time_call(fn: Callable[[], object], *, repeats: int, min_time_s: float) -> float:
    """Median seconds per call of one function (see :func:`_time_calls`)."""
    return _time_calls([fn], repeats=repeats, min_time_s=min_time_s)[0]


def measure_matmul(cfg: ProbeConfig) -> list[dict[str, float]]:
    """TFLOP/s of a training GEMM triple for the MLP shape ``(tokens x d) @ (d x 4d)``: the
    forward product and its two backward products (``dY W^T`` and ``X^T dY``), ``d`` being the
    per-rank width (``hidden / tp``). Training is what the emulator prices, so the probe times
    the backward's transposed layouts too."""
    import torch

    kw, sync = _placement(cfg)
    fns: list[Callable[[], object]] = []
    for d in cfg.gemm_dims:
        x = torch.randn(cfg.gemm_tokens, d, **kw)
        w = torch.randn(d, 4 * d, **kw)
        dy = torch.randn(cfg.gemm_tokens, 4 * d, **kw)

        def triple(x: torch.Tensor = x, w: torch.Tensor = w, dy: torch.Tensor = dy) -> None:
            torch.matmul(x, w)
            torch.matmul(dy, w.T)
            torch.matmul(x.T, dy)

        fns.append(triple)
    secs = _time_calls(fns, repeats=cfg.repeats, min_time_s=cfg.min_time_s, sync=sync)
    # the forward product's FLOPs; the backward's two products as the time model counts them
    fwd = [2.0 * cfg.gemm_tokens * d * 4 * d for d in cfg.gemm_dims]
    return [
        {"tokens": cfg.gemm_tokens, "dim": d, "tflops": (1 + GEMM_BACKWARD_FACTOR) * f / sec / 1e12}
        for d, f, sec in zip(cfg.gemm_dims, fwd, secs, strict=True)
    ]


def measure_attention(cfg: ProbeConfig) -> list[dict[str, float]]:
    """TFLOP/s of ``scaled_dot_product_attention`` forward + backward, counted as the time
    model does: ``1 + costmodel.ATTN_BACKWARD_FACTOR`` (3.5) x the forward's ``4 b h s^2 d``
    FLOPs, no mask."""
    import torch
    import torch.nn.functional as F

    kw, sync = _placement(cfg)
    fns: list[Callable[[], object]] = []
    for s in cfg.attn_seqs:
        q, k, v = (
            torch.randn(1, cfg.attn_heads, s, cfg.head_dim, requires_grad=True, **kw)
            for _ in range(3)
        )
        grad = torch.randn(1, cfg.attn_heads, s, cfg.head_dim, **kw)

        def step(
            q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v, grad: torch.Tensor = grad
        ) -> None:
            out = F.scaled_dot_product_attention(q, k, v)
            torch.autograd.grad(out, (q, k, v), grad)

        fns.append(step)
    secs = _time_calls(fns, repeats=cfg.repeats, min_time_s=cfg.min_time_s, sync=sync)
    fwd = [4.0 * cfg.attn_heads * s * s * cfg.head_dim for s in cfg.attn_seqs]
    return [
        {"seq": s, "head_dim": cfg.head_dim, "tflops": (1 + ATTN_BACKWARD_FACTOR) * f / sec / 1e12}
        for s, f, sec in zip(cfg.attn_seqs, fwd, secs, strict=True)
    ]


def measure_elementwise_gb_s(cfg: ProbeConfig) -> float:
    """GB/s that a transformer's elementwise kernels reach: bytes read + written by LayerNorm,
    add and multiply on a ``(tokens x 128)`` activation and tanh-GELU on the MLP's 4x wider one
    (the mix of one block), over their time. On a GPU this is close to HBM bandwidth; on a CPU
    the math of GELU/LayerNorm, not memory, bounds it, and the time model's elementwise and
    optimizer terms must see that."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(cfg.gemm_tokens, 128)
    wide = torch.randn(cfg.gemm_tokens, 512)

    def chain(x: torch.Tensor = x, wide: torch.Tensor = wide) -> None:
        F.layer_norm(x, (128,))
        F.gelu(wide, approximate="tanh")
        torch.add(x, x)
        torch.mul(x, x)

    sec = _time_call(chain, repeats=cfg.repeats, min_time_s=cfg.min_time_s)
    nbytes = (2 * x.numel() + 3 * x.numel() * 2 + 2 * wide.numel()) * x.element_size()
    return nbytes / sec / 1e9


def measure_op_overhead_us(cfg: ProbeConfig) -> float:
    """Host microseconds per framework op: forward + backward of a pre-norm transformer block
    (``nn.TransformerEncoderLayer``: norms, attention, MLP, residuals) on tensors so small that
    only module calls, dispatch, autograd bookkeeping and allocation cost anything. Ops are
    counted the way the model's ``ops_per_layer`` is (a TorchDispatchMode, views included) and
    timed without it."""
    import torch
    from torch import nn
    from torch.utils._python_dispatch import TorchDispatchMode

    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
    x = torch.randn(1, 4, 8)

    def block() -> None:
        layer(x).square().mean().backward()

    class _Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            _Count.ops += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        block()
    sec = _time_call(block, repeats=cfg.repeats, min_time_s=cfg.min_time_s)
    return sec / _Count.ops * 1e6


def measure_memory_bandwidth_gb_s(cfg: ProbeConfig) -> float:
    """GB/s of a large tensor copy (bytes read + bytes written)."""
    import torch

    n = cfg.copy_mb * 2**20 // 4
    src = torch.randn(n)
    dst = torch.empty_like(src)
    sec = _time_call(lambda: dst.copy_(src), repeats=cfg.repeats, min_time_s=cfg.min_time_s)
    return 2 * src.numel() * 4 / sec / 1e9


def measure_loopback(cfg: ProbeConfig) -> dict[str, float]:
    """TCP over 127.0.0.1 between two threads: one-way bandwidth (GB/s) and latency (us, half a
    1-byte round trip). Binds a free port; every socket has a timeout."""
    payload = b"x" * (cfg.loopback_mb * 2**20)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(30)
        port = server.getsockname()[1]
        received: dict[str, float] = {}

        def sink() -> None:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(30)
                # Latency: echo 1-byte pings.
                for _ in range(200):
                    conn.sendall(conn.recv(1))
                got = 0
                while got < len(payload):
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        break
                    got += len(chunk)
                received["bytes"] = got
                conn.sendall(b"k")

        th = threading.Thread(target=sink, daemon=True)
        th.start()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtts = []
            for _ in range(200):
                t0 = time.perf_counter()
                c.sendall(b"p")
                c.recv(1)
                rtts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            c.sendall(payload)
            c.recv(1)
            sec = time.perf_counter() - t0
        th.join(timeout=30)
    if received.get("bytes") != len(payload):
        raise RuntimeError(
            f"loopback probe lost data: {received.get('bytes')} of {len(payload)} bytes"
        )
    return {"gb_s": len(payload) / sec / 1e9, "latency_us": statistics.median(rtts) / 2 * 1e6}


def measure_compute_concurrent(cfg: ProbeConfig, *, timeout_s: float = 120.0) -> dict[str, Any]:
    """Matmul and attention rates (and the host time per op) per rank while ``cfg.concurrent_ranks`` processes measure at
    once: the rate each rank of a local multi-rank job gets when they share the machine's cores
    and memory bandwidth. Rates are averaged over ranks, shape by shape. The workers pass a
    start gate once torch is imported, so their measurements run at the same time."""
    import select

    one = dataclasses.replace(cfg, concurrent_ranks=1, gloo=False)
    arg = json.dumps(dataclasses.asdict(one))
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads or 1)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "step_infra.emulator.hwprobe", "--compute-worker", arg],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(cfg.concurrent_ranks)
    ]
    results = []
    try:
        deadline = time.monotonic() + timeout_s
        for p in procs:
            assert p.stdout is not None
            ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready or p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"compute probe worker {p.pid} did not start in {timeout_s} s")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            out, err = p.communicate(timeout=timeout_s)
            if p.returncode:
                raise RuntimeError(f"compute probe exited {p.returncode}: {err.strip()[-400:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    merged: dict[str, Any] = {
        "op_overhead_us": statistics.mean(res["op_overhead_us"] for res in results)
    }
    for kind in ("matmul", "attention"):
        rows = [dict(r) for r in results[0][kind]]
        for i, row in enumerate(rows):
            row["tflops"] = statistics.mean(res[kind][i]["tflops"] for res in results)
        merged[kind] = rows
    return merged


def _compute_worker(arg: str) -> None:
    fields = json.loads(arg)
    for key in ("gemm_dims", "attn_seqs"):
        fields[key] = tuple(fields[key])
    cfg = ProbeConfig(**fields)
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sys.stdout.write("ready\n")  # start gate: wait until every worker has imported torch
    sys.stdout.flush()
    sys.stdin.readline()
    out = {
        "matmul": measure_matmul(cfg),
        "attention": measure_attention(cfg),
        "op_overhead_us": measure_op_overhead_us(cfg),
    }
    sys.stdout.write(json.dumps(out) + "\n")


def collect_rank_outputs(
    procs: list[subprocess.Popen[str]], *, timeout_s: float, what: str
) -> list[str]:
    """The stdout of every rank process we started; a rank that fails raises with its
    stderr's tail, and whatever still runs then (or on a timeout) is killed by its PID."""
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout_s)
            if p.returncode:
                raise RuntimeError(f"{what} exited {p.returncode}: {err.strip()[-600:]}")
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure_gloo_allreduce(
    cfg: ProbeConfig, *, timeout_s: float = 90.0, reps: int | None = None
) -> dict[str, Any]:
    """Pairs of gloo processes on this machine, timed the way a training step uses them.

    A step issues its collectives between bursts of compute and pays their sum, so each
    all-reduce here follows a fixed amount of matmul work (a rank that computes slower arrives
    later, as in a job) and the *mean* over ``reps`` (``cfg.gloo_reps``) is kept: the rare slow wake-ups of a
    shared, virtualized host are part of what a step pays, and a median hides them. Sizes
    64 KiB, 1 MiB and ``loopback_mb`` give the ring's per-hop latency and bus bandwidth
    (``t = 2 (n-1) lat + 2 (n-1)/n bytes / busbw``, the time model's
    ``costmodel.ring_allreduce_terms``, least squares). Each rank is a
    :mod:`step_infra.emulator.gloo_probe_worker` process. Then the big all-reduce
    runs asynchronously beside a compute burst of about its length: the share of the compute
    time it hid under (from the medians of ``reps / 5`` repeats of each, 9 at least) is
    ``overlap`` (near 0 on a CPU, whose cores do both). Both processes are ours and are
    killed by PID if they outlive ``timeout_s``. With ``cfg.concurrent_ranks`` > 2 that many
    processes measure at once, in pairs, and the pairs' figures are averaged."""
    import numpy as np

    # As many ranks as the job runs here, in pairs that all measure at once: a rank's
    # collective then competes for the cores with the others' compute and collectives.
    pairs = max(1, cfg.concurrent_ranks // 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for _ in range(pairs):
        args = [str(free_port()), str(cfg.loopback_mb), str(reps or cfg.gloo_reps)]
        procs += [
            subprocess.Popen(
                [sys.executable, "-m", "step_infra.emulator.gloo_probe_worker", str(r), *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for r in range(2)
        ]
    outs = collect_rank_outputs(procs, timeout_s=timeout_s, what="gloo probe rank")
    per_pair = [json.loads(o.strip().splitlines()[-1]) for o in outs[::2]]  # rank 0 of each
    res = {
        key: statistics.mean(r[key] for r in per_pair)
        for key in ("hot_small_s", "compute_s", "allreduce_s", "overlapped_s")
    }
    res["sizes"] = {
        size: statistics.mean(r["sizes"][size] for r in per_pair) for size in per_pair[0]["sizes"]
    }
    hops, share = ring_allreduce_terms(2.0)  # the time model's ring over the 2 ranks
    nbytes = np.array([float(k) for k in res["sizes"]])
    secs = np.array(list(res["sizes"].values()), dtype=float)
    # relative least squares: each size weighs the same whatever its time
    design = np.stack([np.full_like(nbytes, hops), share * nbytes], axis=1)
    (lat_s, inv_bw), *_ = np.linalg.lstsq(design / secs[:, None], np.ones_like(secs), rcond=None)
    if inv_bw <= 0 or lat_s <= 0:  # noise swamped one term: fall back to the two extremes
        lat_s = secs[0] / hops
        inv_bw = max(secs[-1] - secs[0], 1e-9) / (share * (nbytes[-1] - nbytes[0]))
    # time saved by running both at once, from the medians of each (robust to one slow run)
    hidden = res["compute_s"] + res["allreduce_s"] - res["overlapped_s"]
    return {
        "busbw_gb_s": 1.0 / inv_bw / 1e9,
        "latency_us": lat_s * 1e6,
        "hot_latency_us": res["hot_small_s"] / hops * 1e6,
        "overlap": min(1.0, max(0.0, hidden / res["compute_s"])),
        "in_context_s": {str(int(b)): float(t) for b, t in zip(nbytes, secs, strict=True)},
        "overlap_probe_s": {
            "compute": res["compute_s"],
            "allreduce": res["allreduce_s"],
            "both": res["overlapped_s"],
        },
    }


def fit_gemm_curve(rows: list[dict[str, float]]) -> tuple[float, float]:
    """Fit ``rate = rate_max x costmodel.gemm_fill(d, tokens, half_dim)`` (the time model's
    GEMM curve) to measured rates by least squares in log space; returns (rate_max TFLOP/s,
    half_dim).

    A machine has no datasheet peak here, so the fitted asymptote is the profile's peak and
    ``gemm_eff_max`` is 1: the curve, not a guessed peak, carries the measurement.
    """
    import numpy as np
    from scipy.optimize import least_squares

    d = np.array([r["dim"] for r in rows], dtype=float)
    t = np.array([r["tokens"] for r in rows], dtype=float)
    y = np.array([r["tflops"] for r in rows], dtype=float)
    top = float(y.max())

    def resid(x: np.ndarray) -> np.ndarray:
        rate_max, half = x
        return np.log(rate_max * gemm_fill(d, t, half)) - np.log(y)

    sol = least_squares(resid, x0=[top * 1.2, 32.0], bounds=([top * 0.5, 0.0], [top * 100, 1e5]))
    return float(sol.x[0]), float(sol.x[1])


def attention_efficiency(rows: list[dict[str, float]], peak_tflops: float) -> float:
    """``attn_eff`` that makes the time model's attention curve (``peak x attn_eff x
    costmodel.attention_fill``) pass through the median row."""
    effs = [
        r["tflops"] / peak_tflops / float(attention_fill(r["seq"], r["head_dim"])) for r in rows
    ]
    return float(statistics.median(effs))


def gpu_probe_config() -> ProbeConfig:
    """GEMM and attention shapes of a video DiT on one GPU, in bf16 (about 20 s on an H100)."""
    return ProbeConfig(
        gemm_dims=(512, 1024, 2048, 4096, 6144),
        gemm_tokens=8192,
        attn_seqs=(1024, 4096, 8192),
        attn_heads=16,
        head_dim=128,
        repeats=5,
        min_time_s=0.05,
        gloo=False,
        device="cuda",
        dtype="bfloat16",
    )


def calibrate_gpu(gpu: GPUSpec, cfg: ProbeConfig | None = None) -> tuple[GPUSpec, dict[str, Any]]:
    """``gpu`` (a datasheet preset) with its GEMM curve and attention efficiency fitted to
    rates measured on this process's device: ``gemm_eff_max`` = fitted asymptote / datasheet
    peak, ``gemm_half_dim``, ``attn_eff``. Returns the spec and the measured rows."""
    cfg = cfg or gpu_probe_config()
    gemm = measure_matmul(cfg)
    attention = measure_attention(cfg)
    rate_max, half_dim = fit_gemm_curve(gemm)
    fitted = dataclasses.replace(
        gpu,
        gemm_eff_max=rate_max / gpu.peak_tflops_bf16,
        gemm_half_dim=half_dim,
        attn_eff=attention_efficiency(attention, gpu.peak_tflops_bf16),
        source=f"{gpu.source}; GEMM and attention fitted on {cfg.device} ({cfg.dtype})",
    )
    return fitted, {"gemm": gemm, "attention": attention}


def build_profile(
    measurements: dict[str, Any], *, name: str, ranks_per_node: int = 1
) -> dict[str, Any]:
    """Turn raw measurements into ``{"gpu": ..., "cluster": ..., "measurements": ...}``.

    The peak is the asymptote of the fitted GEMM curve (there is no datasheet for a CPU);
    efficiencies are relative to it. Link bandwidth inside and between "nodes" is the loopback one: every rank of
    a local job is on this machine. ``comm_eff`` is gloo bus bandwidth over raw loopback.
    """
    from step_infra.emulator.specs import ClusterSpec, GPUSpec

    mm = measurements["matmul"]
    peak, half = fit_gemm_curve(mm)
    loop = measurements["loopback"]
    gloo = measurements.get("gloo")
    comm_eff = min(1.0, gloo["busbw_gb_s"] / loop["gb_s"]) if gloo else 0.5
    latency = gloo["latency_us"] if gloo else loop["latency_us"]
    # Without a gloo measurement assume nothing hides: a CPU's cores both compute and copy.
    overlap = gloo.get("overlap", 0.0) if gloo else 0.0
    gpu_values: dict[str, Any] = {
        "name": name,
        "peak_tflops_bf16": peak,
        "peak_tflops_fp8": peak,
        "hbm_gb": measurements["memory_gb"],
        "hbm_gb_s": min(
            measurements["memory_gb_s"], measurements.get("elementwise_gb_s", math.inf)
        ),
        "nvlink_gb_s": loop["gb_s"],
        "source": f"step-infra calibrate, measured {measurements['when']} on {measurements['host']}",
        "gemm_eff_max": 1.0,
        "gemm_half_dim": half,
        "attn_eff": attention_efficiency(measurements["attention"], peak),
        "fp8_gemm_eff_max": 1.0,
        "comm_eff": comm_eff,
        "comm_overlap": overlap,
        "async_dispatch": False,  # the probe runs torch on the CPU: each op runs on the host
    }
    if "op_overhead_us" in measurements:  # profiles measured before it keep the default
        gpu_values["op_overhead_us"] = measurements["op_overhead_us"]
    cluster_values: dict[str, Any] = {
        "gpus_per_node": ranks_per_node,
        "nic_gb_s": loop["gb_s"],
        "nvlink_latency_us": latency,
        "nic_latency_us": latency,
    }
    gpu_fields = {f.name for f in dataclasses.fields(GPUSpec)}
    cluster_fields = {f.name for f in dataclasses.fields(ClusterSpec)} - {"gpu", "nodes"}
    return {
        "gpu": {k: v for k, v in gpu_values.items() if k in gpu_fields},
        "cluster": {k: v for k, v in cluster_values.items() if k in cluster_fields},
        "measurements": measurements,
    }


def probe(cfg: ProbeConfig | None = None) -> dict[str, Any]:
    """Run every measurement and return them raw (see :func:`build_profile`)."""
    import psutil
    import torch

    cfg = cfg or ProbeConfig()
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        t0 = time.perf_counter()
        out: dict[str, Any] = {
            "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "host": platform.node(),
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
            "concurrent_ranks": cfg.concurrent_ranks,
            "memory_gb_s": measure_memory_bandwidth_gb_s(cfg),
            "elementwise_gb_s": measure_elementwise_gb_s(cfg),
            "memory_gb": psutil.virtual_memory().total / 1e9,
            "loopback": measure_loopback(cfg),
        }
        if cfg.concurrent_ranks > 1:
            out.update(measure_compute_concurrent(cfg))
        else:
            out["matmul"], out["attention"] = measure_matmul(cfg), measure_attention(cfg)
            out["op_overhead_us"] = measure_op_overhead_us(cfg)
        if cfg.gloo:
            out["gloo"] = measure_gloo_allreduce(cfg)
        out["probe_s"] = time.perf_counter() - t0
        return out
    finally:
        torch.set_num_threads(old_threads)


def calibrate(
    out_path: str | Path,
    *,
    cfg: ProbeConfig | None = None,
    name: str = "local-cpu",
    ranks_per_node: int = 1,
) -> dict[str, Any]:
    """Measure, build the profile, write it as JSON to ``out_path`` and return it.

    With ``ranks_per_node`` > 1 compute rates are measured with that many ranks at once (unless
    ``cfg`` already sets ``concurrent_ranks``), since that is what each rank of the job gets.
    """
    cfg = cfg or ProbeConfig()
    if ranks_per_node > 1 and cfg.concurrent_ranks == 1:
        cfg = dataclasses.replace(cfg, concurrent_ranks=ranks_per_node)
    profile = build_profile(probe(cfg), name=name, ranks_per_node=ranks_per_node)
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=2, sort_keys=True) + "\n")
    log.info("wrote hardware profile %s", path)
    return profile


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--compute-worker":
    _compute_worker(sys.argv[2])
