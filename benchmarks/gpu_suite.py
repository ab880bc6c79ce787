"""Every GPU figure in one command: kernels (correct, fast), a 30B DiT block, the emulator's
prediction of it, and StepRPC with CUDA tensors.

A GPU machine is lent rarely and briefly, so this is the one prepared command to run there
(``make gpu-check``; under 8 minutes on one H100/H200). It prints a table and writes JSON;
it skips what the machine lacks, saying why (flash-attn, Transformer Engine, a second GPU),
and never fails because a figure is low: figures are reported against their targets. A
kernel that computes wrong is reported the same way (``ok: false`` in its row).

``--dry-run`` runs the same code on the CPU with tiny shapes (Triton in its interpreter,
fp32/fp16 since the interpreter mishandles bf16): ``make test`` runs it, so the suite cannot
rot between GPU sessions. Dry-run timings say nothing about any GPU.

    python benchmarks/gpu_suite.py [--json PATH] [--dry-run] [--sections kernels,speed,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

CUDA = torch.cuda.is_available()
# Triton decides at kernel decoration whether to interpret: set this before importing kernels.
os.environ.setdefault("TRITON_INTERPRET", "0" if CUDA else "1")

from step_infra.kernels import adaln_modulate, gated_residual, qk_norm_rope  # noqa: E402
from step_infra.kernels.adaln import (  # noqa: E402
    adaln_modulate_reference,
    gated_residual_reference,
)
from step_infra.kernels.flash_attention import (  # noqa: E402
    _block_sizes,
    attention_reference,
    flash_attention_triton,
)
from step_infra.kernels.qk_norm_rope import qk_norm_rope_reference  # noqa: E402

SECTIONS = ("kernels", "speed", "dit", "emulator", "rpc", "train")
# Error bounds of the kernel checks, relative to the largest reference value: bf16 keeps 8
# mantissa bits (P is rounded to bf16 before P @ V), fp16 11, fp32 in the interpreter is
# limited by the blocked softmax's summation order.
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}
# Targets of the issue (H100 SXM; the suite scales the TFLOP/s ones by the device's peak).
TARGETS = {
    "attn_fwd_tflops_16k": 450.0,
    "attn_bwd_tflops_16k": 300.0,
    "attn_vs_sdpa_cp8": 1.2,
    "elementwise_hbm_fraction": 0.8,
    "block_mfu": 0.4,
    "emulator_error": 0.15,
    "rpc_vs_staged_copy": 0.8,
}
H100_PEAK_BF16 = 989.0


@dataclasses.dataclass(slots=True)
class Suite:
    dry: bool
    device: str
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    rows: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)

    def row(self, section: str, what: str, value: str, target: str = "") -> None:
        self.rows.append((section, what, value, target))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def best_time_s(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time of ``fn`` after one warm-up call (compilation, autotuning)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


def gpu_spec_name() -> str:
    """The emulator preset of this device (``h100-sxm`` when it cannot tell)."""
    if not CUDA:
        return "h100-sxm"
    name = torch.cuda.get_device_name().lower()
    for key, preset in (("h200", "h200"), ("h20", "h20"), ("b200", "b200"), ("a100", "a100-80g")):
        if key in name:
            return preset
    return "h100-sxm"


# ------------------------------------------------------------------------- 1. kernels correct
def attention_cases(dry: bool) -> list[dict[str, Any]]:
    s = 1 if dry else 16  # GPU cases are longer, still odd-sized
    return [
        {"name": "odd length", "sq": 77 * s + 3, "sk": 77 * s + 3},
        {"name": "unequal q/k", "sq": 50 * s + 1, "sk": 83 * s + 5},
        {"name": "per-sample key lengths", "sq": 64 * s, "sk": 96 * s, "lengths": [96 * s, 37]},
        {"name": "causal", "sq": 70 * s + 1, "sk": 70 * s + 1, "causal": True},
        {"name": "with LSE", "sq": 45 * s + 2, "sk": 61 * s + 7, "lse": True},
    ]


def check_attention(suite: Suite, case: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    g = torch.Generator(device=suite.device).manual_seed(0)
    heads, d = (1, 32) if suite.dry else (8, 128)
    b = 2 if case.get("lengths") or not suite.dry else 1  # per-sample lengths need a batch
    shape_q, shape_k = (b, case["sq"], heads, d), (b, case["sk"], heads, d)
    q32, k32, v32 = (
        torch.randn(sh, generator=g, device=suite.device) for sh in (shape_q, shape_k, shape_k)
    )
    lengths = case.get("lengths")
    kv = torch.tensor(lengths, device=suite.device) if lengths else None
    kw = {"kv_lengths": kv, "causal": case.get("causal", False), "return_lse": True}
    q, k, v = (t.to(dtype).requires_grad_() for t in (q32, k32, v32))
    out, lse = flash_attention_triton(q, k, v, **kw)  # type: ignore[misc]
    grad = torch.randn(out.shape, generator=g, device=suite.device)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    # the reference in fp32 from the same (rounded) inputs
    rq, rk, rv = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_reference(rq, rk, rv, **kw)  # type: ignore[misc]
    rdq, rdk, rdv = torch.autograd.grad(ref, (rq, rk, rv), grad)
    errors = {
        "out": _rel(out, ref),
        "dq": _rel(dq, rdq),
        "dk": _rel(dk, rdk),
        "dv": _rel(dv, rdv),
    }
    if case.get("lse"):
        finite = torch.isfinite(ref_lse)
        errors["lse"] = float((lse.float() - ref_lse)[finite].abs().max())
    tol = TOLERANCE[dtype]
    return {
        "case": case["name"],
        "dtype": str(dtype).removeprefix("torch."),
        "errors": errors,
        "tolerance": tol,
        "ok": all(e <= tol for e in errors.values()),
    }


def check_elementwise(suite: Suite, dtype: torch.dtype) -> list[dict[str, Any]]:
    g = torch.Generator(device=suite.device).manual_seed(1)
    dev = suite.device
    b, s, h = (2, 37, 64) if suite.dry else (2, 1031, 6144)
    x = torch.randn(b, s, h, generator=g, device=dev)
    shift, scale, gate = (0.1 * torch.randn(b, h, generator=g, device=dev) for _ in range(3))
    y = torch.randn(b, s, h, generator=g, device=dev)
    out = []
    tol = TOLERANCE[dtype]

    def compare(name: str, fused: Callable[..., torch.Tensor], ref: Callable[..., torch.Tensor],
                args: tuple[torch.Tensor, ...]) -> None:  # fmt: skip
        ins = [a.to(dtype).requires_grad_() for a in args]
        got = fused(*ins)
        g_out = torch.randn(got.shape, generator=g, device=dev)
        grads = torch.autograd.grad(got, ins, g_out.to(dtype))
        rins = [a.detach().float().requires_grad_() for a in ins]
        want = ref(*rins)
        rgrads = torch.autograd.grad(want, rins, g_out)
        errors = {"out": _rel(got, want)}
        errors.update(
            {f"d{i}": _rel(a, r) for i, (a, r) in enumerate(zip(grads, rgrads, strict=True))}
        )
        # gradients summed over rows (shift, scale, gate, weight) accumulate rounding: 4x
        ok = errors["out"] <= tol and all(e <= 4 * tol for e in errors.values())
        out.append({"kernel": name, "dtype": str(dtype).removeprefix("torch."), "errors": errors,
                    "tolerance": tol, "ok": ok})  # fmt: skip

    compare("adaln_modulate", adaln_modulate, adaln_modulate_reference, (x, shift, scale))
    compare("gated_residual", gated_residual, gated_residual_reference, (x, gate, y))
    heads, d = (2, 32) if suite.dry else (48, 128)
    xr = torch.randn(s, b, heads, d, generator=g, device=dev)
    weight = 1 + 0.1 * torch.randn(d, generator=g, device=dev)
    angles = torch.rand(s, d // 2, generator=g, device=dev) * 3.0

    def qk(xv: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
        return qk_norm_rope(xv, wv, angles)

    def qk_ref(xv: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
        return qk_norm_rope_reference(xv, wv, angles)

    compare("qk_norm_rope", qk, qk_ref, (xr, weight))
    return out


def section_kernels(suite: Suite) -> None:
    dtypes = [torch.float32, torch.float16] if suite.dry else [torch.bfloat16, torch.float16]
    rows = [check_attention(suite, c, dt) for dt in dtypes for c in attention_cases(suite.dry)]
    rows += [r for dt in dtypes for r in check_elementwise(suite, dt)]
    suite.results["kernels"] = rows
    bad = [f"{r.get('case', r.get('kernel'))} {r['dtype']}" for r in rows if not r["ok"]]
    worst = max(max(r["errors"].values()) for r in rows)
    suite.row("kernels", f"{len(rows)} checks vs fp32 reference", f"{len(rows) - len(bad)} ok",
              "all ok")  # fmt: skip
    suite.row("kernels", "largest relative error", f"{worst:.2e}", "per dtype tolerance")
    if bad:
        suite.row("kernels", "out of tolerance", ", ".join(bad))


# ---------------------------------------------------------------------------- 2. kernels fast
def _sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION] if CUDA else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)


def attention_speed(suite: Suite, seq: int, heads: int, repeats: int) -> dict[str, Any]:
    dtype = torch.bfloat16 if CUDA else torch.float32
    d = 128 if not suite.dry else 32
    q, k, v = (torch.randn(1, seq, heads, d, device=suite.device, dtype=dtype, requires_grad=True)
               for _ in range(3))  # fmt: skip
    fwd_flops = 4.0 * heads * seq * seq * d
    impls: dict[str, Callable[[], torch.Tensor]] = {
        "triton": lambda: flash_attention_triton(q, k, v),  # type: ignore[dict-item]
        "sdpa": lambda: _sdpa_flash(q, k, v),
    }
    if CUDA and importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_func

        impls["flash_attn"] = lambda: flash_attn_func(q, k, v)
    row: dict[str, Any] = {"seq": seq, "heads": heads, "head_dim": d}
    for name, fn in impls.items():
        fwd = best_time_s(fn, repeats)
        out = fn()
        grad = torch.randn_like(out)
        bwd = best_time_s(
            lambda out=out, grad=grad: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True),
            repeats,
        )
        row[f"{name}_fwd_tflops"] = fwd_flops / fwd / 1e12
        row[f"{name}_bwd_tflops"] = 2.5 * fwd_flops / bwd / 1e12  # backward: 2.5x the forward
    row["fwd_vs_sdpa"] = row["triton_fwd_tflops"] / row["sdpa_fwd_tflops"]
    row["bwd_vs_sdpa"] = row["triton_bwd_tflops"] / row["sdpa_bwd_tflops"]
    return row


def elementwise_bandwidth(suite: Suite, hbm_gb_s: float, repeats: int) -> list[dict[str, Any]]:
    dtype = torch.bfloat16 if CUDA else torch.float32
    b, s, h = (1, 64, 64) if suite.dry else (1, 75_888 // 8, 6144)
    x = torch.randn(b, s, h, device=suite.device, dtype=dtype)
    y = torch.randn_like(x)
    shift, scale, gate = (torch.randn(b, h, device=suite.device, dtype=dtype) for _ in range(3))
    heads, d = (2, 32) if suite.dry else (48, 128)
    xr = torch.randn(s, b, heads, d, device=suite.device, dtype=dtype)
    weight = torch.ones(d, device=suite.device, dtype=dtype)
    angles = torch.rand(s, d // 2, device=suite.device)
    size = x.numel() * x.element_size()
    cases = [  # (name, call, bytes moved: reads + writes of the big tensors)
        ("adaln_modulate", lambda: adaln_modulate(x, shift, scale), 2 * size),
        ("gated_residual", lambda: gated_residual(x, gate, y), 3 * size),
        ("qk_norm_rope", lambda: qk_norm_rope(xr, weight, angles), 2 * xr.numel() * xr.element_size()),
    ]  # fmt: skip
    out = []
    for name, fn, nbytes in cases:
        t = best_time_s(fn, repeats)
        gb_s = nbytes / t / 1e9
        out.append({"kernel": name, "gb_s": gb_s, "hbm_fraction": gb_s / hbm_gb_s})
    return out


def autotune_blocks(suite: Suite) -> dict[str, Any]:
    """Sweep the attention kernels' (BLOCK_M, BLOCK_N, warps) at head dim 128: forward +
    backward time of each candidate, the best, and the default the kernels choose for this
    GPU generation (``flash_attention._block_sizes``), so the table in the kernel can be
    corrected from a measurement. A candidate the GPU cannot run is recorded with its error."""
    # the module, not the function the package exports under the same name
    fa = importlib.import_module("step_infra.kernels.flash_attention")

    dtype = torch.bfloat16 if CUDA else torch.float32
    if suite.dry:
        seq, heads, d, repeats = 64, 2, 32, 1
        candidates = [(16, 16, 1), (32, 16, 1), (16, 32, 1)]
    else:
        seq, heads, d, repeats = 8192, 48, 128, 3
        candidates = [(64, 32, 4), (64, 64, 4), (128, 64, 4), (128, 64, 8), (128, 128, 8)]
    cap = torch.cuda.get_device_capability() if CUDA else None
    default = fa._block_sizes(cap, d)
    q, k, v = (torch.randn(1, seq, heads, d, device=suite.device, dtype=dtype, requires_grad=True)
               for _ in range(3))  # fmt: skip
    grad = torch.randn(1, seq, heads, d, device=suite.device, dtype=dtype)

    def step() -> None:
        out = flash_attention_triton(q, k, v)
        torch.autograd.grad(out, (q, k, v), grad)

    original = fa._block_sizes
    timings: dict[str, Any] = {}
    try:
        for cand in dict.fromkeys([default, *candidates]):
            fa._block_sizes = lambda _cap, _d, cand=cand: cand  # type: ignore[assignment]
            try:
                timings[str(list(cand))] = best_time_s(step, repeats)
            except Exception as exc:  # e.g. out of shared memory on this GPU
                timings[str(list(cand))] = f"failed: {type(exc).__name__}: {exc}"[:160]
    finally:
        fa._block_sizes = original
    ran = {c: t for c, t in timings.items() if isinstance(t, float)}
    best = min(ran, key=ran.__getitem__)
    return {"seq": seq, "heads": heads, "head_dim": d, "capability": cap,
            "default": list(default), "best": best, "fwd_bwd_s": timings,
            "default_vs_best": ran[str(list(default))] / ran[best]}  # fmt: skip


def section_speed(suite: Suite) -> None:
    from step_infra.emulator.presets import get_gpu

    gpu = get_gpu(gpu_spec_name())
    scale = gpu.peak_tflops_bf16 / H100_PEAK_BF16
    if suite.dry:
        cases, repeats = [(96, 2)], 1
    else:
        # 4k, 16k, and the 30B model's 75,888 tokens over CP 8 (each rank's chunk)
        cases, repeats = [(4096, 48), (16384, 48), (math.ceil(75_888 / 8), 48)], 5
    rows = [attention_speed(suite, s, h, repeats) for s, h in cases]
    ew = elementwise_bandwidth(suite, gpu.hbm_gb_s, repeats)
    tuned = autotune_blocks(suite)
    blocks = {str(d): _block_sizes(torch.cuda.get_device_capability() if CUDA else None, d)
              for d in (64, 128)}  # fmt: skip
    suite.results["speed"] = {"attention": rows, "elementwise": ew, "block_sizes": blocks,
                              "autotune": tuned, "gpu_preset": gpu.name,
                              "hbm_gb_s": gpu.hbm_gb_s}  # fmt: skip
    for r in rows:
        target = ""
        if r["seq"] == 16384:
            target = (f"fwd >= {TARGETS['attn_fwd_tflops_16k'] * scale:.0f}, "
                      f"bwd >= {TARGETS['attn_bwd_tflops_16k'] * scale:.0f}")  # fmt: skip
        if r["seq"] == math.ceil(75_888 / 8):
            target = f">= {TARGETS['attn_vs_sdpa_cp8']}x SDPA"
        suite.row("speed", f"attention seq {r['seq']} x {r['heads']} heads (TFLOP/s)",
                  f"fwd {r['triton_fwd_tflops']:.3g} ({r['fwd_vs_sdpa']:.2f}x sdpa), "
                  f"bwd {r['triton_bwd_tflops']:.3g} ({r['bwd_vs_sdpa']:.2f}x)", target)  # fmt: skip
    for e in ew:
        suite.row("speed", f"{e['kernel']} bandwidth", f"{e['gb_s']:.3g} GB/s = "
                  f"{e['hbm_fraction']:.0%} of HBM", f">= {TARGETS['elementwise_hbm_fraction']:.0%}")  # fmt: skip
    suite.row("speed", "attention block sizes (M, N, warps) chosen by head dim", json.dumps(blocks))
    suite.row("speed", f"block sweep at seq {tuned['seq']}, d {tuned['head_dim']}: best",
              f"{tuned['best']}; the default {tuned['default']} takes "
              f"{tuned['default_vs_best']:.2f}x the best's time", "default = best")  # fmt: skip


# --------------------------------------------------------------------- 3./4. the DiT block
def block_config(dry: bool) -> tuple[Any, tuple[int, int, int], int, int]:
    """(DiTConfig of one block, latent (F, H, W), short and long text tokens)."""
    from step_infra.models.config import get_preset

    if dry:
        return get_preset("micro-dit").replace(num_layers=1), (2, 4, 4), 7, 5
    # 204 x 544 x 992 clips: 36 latent frames of 34 x 62 (8x time, 16x16 space) = 75,888
    return get_preset("stepvideo-t2v-30b").replace(num_layers=1), (36, 34, 62), 77, 320


def time_block(suite: Suite, attention: str) -> dict[str, Any]:
    """Forward + backward + AdamW of one block at its real sequence length."""
    from step_infra.kernels import dispatch
    from step_infra.models import attention as attention_module
    from step_infra.models.dit import build_dit

    config, (f, hh, ww), ls, ll = block_config(suite.dry)
    dtype = torch.bfloat16 if CUDA else torch.float32
    original = attention_module.flash_attention
    if attention == "sdpa":  # the same block with torch's attention in place of ours
        attention_module.flash_attention = lambda *a, **k: dispatch.flash_attention(  # type: ignore[assignment]
            *a, **k, backend="reference"
        )
    try:
        model = build_dit(config, seed=0).to(suite.device, dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=CUDA)
        x = torch.randn(1, config.in_channels, f, hh, ww, device=suite.device, dtype=dtype)
        t = torch.rand(1, device=suite.device)
        short = torch.randn(1, ls, config.text_dim_short, device=suite.device, dtype=dtype)
        long_ = torch.randn(1, ll, config.text_dim_long, device=suite.device, dtype=dtype)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            out = model(x, t, short, None, long_, None)
            out.float().square().mean().backward()
            opt.step()

        seconds = best_time_s(step, 1 if suite.dry else 3)
        peak_gb = torch.cuda.max_memory_allocated() / 1e9 if CUDA else float("nan")
    finally:
        attention_module.flash_attention = original
    return {"attention": attention, "step_s": seconds, "tokens": f * hh * ww, "peak_gb": peak_gb}


def block_model_spec(suite: Suite) -> Any:
    from step_infra.emulator.presets import get_model

    _, (f, hh, ww), ls, ll = block_config(suite.dry)
    base = get_model("micro-dit" if suite.dry else "stepvideo-t2v-30b")
    return dataclasses.replace(base, layers=1, seq_len=f * hh * ww, text_tokens=ls + ll)


def section_dit(suite: Suite) -> None:
    from step_infra.emulator.counts import training_flops_per_sample
    from step_infra.emulator.presets import get_gpu

    spec = block_model_spec(suite)
    flops = training_flops_per_sample(spec)
    peak = get_gpu(gpu_spec_name()).peak_tflops_bf16 * 1e12
    rows = []
    for attention in ("ours", "sdpa"):
        r = time_block(suite, attention)
        r["model_tflops"] = flops / r["step_s"] / 1e12
        r["mfu"] = flops / r["step_s"] / peak
        rows.append(r)
        suite.row("dit", f"1 block fwd+bwd+AdamW, {r['tokens']} tokens, {attention} attention",
                  f"{r['step_s']:.3f} s, {r['model_tflops']:.3g} TFLOP/s, MFU {r['mfu']:.1%}",
                  f"MFU >= {TARGETS['block_mfu']:.0%}" if attention == "ours" else "")  # fmt: skip
    te = importlib.util.find_spec("transformer_engine") is not None
    suite.results["dit"] = {"rows": rows, "flops_per_step": flops, "transformer_engine": te}
    if not te:
        suite.row("dit", "Transformer Engine layers", "skipped: transformer_engine not installed "
                  "(pip install 'step-infra[gpu]')")  # fmt: skip


def section_emulator(suite: Suite) -> None:
    """The emulator's price of the measured block step on this device's preset."""
    from step_infra.emulator import cluster_for, estimate
    from step_infra.emulator.strategy import Strategy

    measured = suite.results.get("dit", {}).get("rows", [{}])[0].get("step_s")
    if measured is None:
        suite.row(
            "emulator", "prediction of the block step", "skipped: the dit section did not run"
        )
        return
    from step_infra.emulator.hwprobe import ProbeConfig, calibrate_gpu, gpu_probe_config
    from step_infra.emulator.presets import get_gpu

    strategy = Strategy(tp=1, micro_batch=1, global_batch=1, distributed_optimizer=False)
    preset = get_gpu(gpu_spec_name())
    probe = gpu_probe_config() if not suite.dry else ProbeConfig(
        gemm_dims=(32, 64, 128), gemm_tokens=256, attn_seqs=(64, 128), attn_heads=2,
        head_dim=32, repeats=2, min_time_s=0.01, gloo=False)  # fmt: skip
    fitted, rows = calibrate_gpu(preset, probe)
    out: dict[str, Any] = {"preset": preset.name, "measured_s": measured, "probe": rows,
                           "fitted": {k: getattr(fitted, k) for k in
                                      ("gemm_eff_max", "gemm_half_dim", "attn_eff")}}  # fmt: skip
    for label, gpu in (("datasheet + fit", preset), ("calibrated on this device", fitted)):
        est = estimate(block_model_spec(suite), cluster_for(gpu, 1), strategy)
        error = est.step_time_s / measured - 1
        out[label] = {"predicted_s": est.step_time_s, "error": error}
        suite.row("emulator", f"block step, {preset.name} preset, {label}",
                  f"predicted {est.step_time_s:.3f} s vs measured {measured:.3f} s ({error:+.1%})",
                  f"within {TARGETS['emulator_error']:.0%}")  # fmt: skip
    out["predicted_s"] = out["calibrated on this device"]["predicted_s"]
    suite.results["emulator"] = out


# ------------------------------------------------------------------------------- 5./6.
def section_rpc(suite: Suite) -> None:
    try:
        from step_infra.rpc.cuda_bench import measure_cuda_pipe
    except ImportError as exc:
        suite.row("rpc", "CUDA tensors over StepRPC", f"skipped: {exc}")
        return
    nbytes, items = (1 << 16, 3) if suite.dry else (256 << 20, 16)
    r = measure_cuda_pipe(nbytes, items, dry_run=suite.dry)
    suite.results["rpc"] = r
    suite.row("rpc", f"CUDA tensors, producer -> consumer ({nbytes >> 20} MiB items)",
              json.dumps({k: v for k, v in r.items() if isinstance(v, int | float | str)}),
              f">= {TARGETS['rpc_vs_staged_copy']}x staged copy")  # fmt: skip


def section_train(suite: Suite) -> None:
    """``step-infra train``'s job on NCCL, one rank per GPU, killed once and resumed."""
    import tempfile
    from pathlib import Path

    from step_infra.data.synthetic import SyntheticConfig
    from step_infra.train.job.config import Faults, gpu_t2v
    from step_infra.train.job.launcher import run_training_job
    from step_infra.train.job.report import job_metrics

    gpus = torch.cuda.device_count() if CUDA else 1
    cfg = gpu_t2v(gpus)
    if suite.dry:  # the same job on gloo, as small as it runs
        cfg = cfg.replace(device="cpu", steps=16, vae_steps=5, checkpoint_every=3,
                          data=SyntheticConfig(num_clips=64, frames=5, height=8, width=8),
                          faults=Faults(kill="node0:5"), sample_prompts=1)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpu-suite-train-") as tmp:
        run_dir = Path(tmp) / cfg.name
        result = run_training_job(cfg, run_dir, fresh=True, predict=False, sample=False,
                                  report=False, job_timeout_s=300.0)  # fmt: skip
        m = job_metrics(run_dir) if (run_dir / "events.jsonl").exists() else {}
    restarts = [e for e in m.get("faults", []) if e.get("event") == "restart"]
    audit = m.get("audit", {})
    suite.results["train"] = {
        "ok": result.ok, "reason": result.reason, "gpus": gpus, "device": cfg.device,
        "layout": m.get("layout"), "measured_step_s": m.get("measured_step_s"),
        "restarts": len(restarts), "exactly_once": audit.get("exactly_once"),
        "wall_s": result.wall_s,
    }  # fmt: skip
    suite.row("train", f"step-infra train ({cfg.device}, {gpus} rank(s), {m.get('layout')})",
              f"ok={result.ok} ({result.reason}); restarts {len(restarts)}; every sample once: "
              f"{audit.get('exactly_once')}; step {m.get('measured_step_s')} s",
              "completes, resumes after kill -9")  # fmt: skip
    if gpus < 2:
        suite.row("train", "tensor parallel on NCCL", "skipped: needs a second GPU")


RUNNERS: dict[str, Callable[[Suite], None]] = {
    "kernels": section_kernels,
    "speed": section_speed,
    "dit": section_dit,
    "emulator": section_emulator,
    "rpc": section_rpc,
    "train": section_train,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write machine-readable results here")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (make test)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {SECTIONS}")
    args = ap.parse_args(argv)
    wanted = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown sections {unknown}; expected a subset of {list(SECTIONS)}")
    if not CUDA and not args.dry_run:
        print("no CUDA device here: running the CPU dry run (tiny shapes; timings mean nothing)")
    suite = Suite(dry=args.dry_run or not CUDA, device="cuda" if CUDA else "cpu")
    t0 = time.monotonic()
    for name in wanted:
        ts = time.monotonic()
        try:
            RUNNERS[name](suite)
        except Exception as exc:  # a section that breaks is reported; the others still run
            suite.results.setdefault("errors", {})[name] = traceback.format_exc()
            suite.row(name, "section failed", f"{type(exc).__name__}: {exc}"[:200])
        suite.results.setdefault("seconds", {})[name] = round(time.monotonic() - ts, 2)
        print(f"[{name}] {time.monotonic() - ts:.1f} s", file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name() if CUDA else "cpu (dry run)"
    print(f"GPU suite on {device}, {time.monotonic() - t0:.0f} s")
    width = max(len(r[1]) for r in suite.rows) + 2
    for section, what, value, target in suite.rows:
        tail = f"   [target: {target}]" if target else ""
        print(f"{section:<9}{what:<{width}}{value}{tail}")
    if args.json:
        doc = {"device": device, "dry_run": suite.dry, "targets": TARGETS, **suite.results}
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=2, default=str)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
