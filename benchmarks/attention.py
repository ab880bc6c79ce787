"""Attention speed: the Triton flash attention against torch SDPA (and flash-attn if installed).

TFLOP/s from analytic FLOPs: forward ``4 b h s^2 d``, backward 2.5x that. On a CUDA device it
runs the issue's grid (seq 4k, 16k, 75,888; head dim 128; 24 and 48 heads; bf16). Without
CUDA it says so and times a small CPU case instead (Triton in the interpreter vs the SDPA
reference), which only checks that the script and kernels run: interpreter timings say
nothing about GPU speed.

    python benchmarks/attention.py [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from _timing import best_time_s

# Triton decides at kernel decoration whether to interpret: set this before importing kernels.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
from step_infra.kernels.flash_attention import flash_attention_triton


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    ).transpose(1, 2)


def bench_case(
    b: int, s: int, h: int, d: int, dtype: torch.dtype, device: str, repeats: int
) -> dict[str, float | str | int]:
    cuda = device == "cuda"
    q, k, v = (
        torch.randn(b, s, h, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
    )
    fwd_flops = 4.0 * b * h * s * s * d
    row: dict[str, float | str | int] = {
        "batch": b,
        "seq": s,
        "heads": h,
        "head_dim": d,
        "dtype": str(dtype).removeprefix("torch."),
    }
    for name, fn in (
        ("triton", lambda: flash_attention_triton(q, k, v)),
        ("sdpa", lambda: _sdpa(q, k, v)),
    ):
        fwd = best_time_s(fn, repeats=repeats, cuda=cuda)
        out = fn()
        grad = torch.randn_like(out)
        bwd = best_time_s(
            lambda out=out, grad=grad: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True),
            repeats=repeats,
            cuda=cuda,
        )
        row[f"{name}_fwd_tflops"] = fwd_flops / fwd / 1e12
        row[f"{name}_bwd_tflops"] = 2.5 * fwd_flops / bwd / 1e12
    row["fwd_ratio_vs_sdpa"] = float(row["triton_fwd_tflops"]) / float(row["sdpa_fwd_tflops"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write machine-readable results here")
    parser.add_argument("--quick", action="store_true", help="only the smallest case")
    args = parser.parse_args()
    if torch.cuda.is_available():
        device, repeats = "cuda", 5
        seqs = [4096] if args.quick else [4096, 16384, 75888]
        cases = [(1, s, h, 128, torch.bfloat16) for s in seqs for h in (24, 48)]
        note = torch.cuda.get_device_name()
    else:
        device, repeats = "cpu", 1
        cases = [(1, 64, 2, 32, torch.float32)]
        note = "no CUDA device: GPU figures still to be measured; CPU case runs Triton in the interpreter"
    print(note)
    rows = [bench_case(b, s, h, d, dt, device, repeats) for b, s, h, d, dt in cases]
    header = f"{'seq':>7} {'heads':>5} {'dtype':>8} {'triton fwd':>11} {'sdpa fwd':>9} {'ratio':>6} {'triton bwd':>11} {'sdpa bwd':>9}"
    print(header)
    for r in rows:
        print(
            f"{r['seq']:>7} {r['heads']:>5} {r['dtype']:>8} {r['triton_fwd_tflops']:>11.4g} {r['sdpa_fwd_tflops']:>9.4g} "
            f"{r['fwd_ratio_vs_sdpa']:>6.2f} {r['triton_bwd_tflops']:>11.4g} {r['sdpa_bwd_tflops']:>9.4g}   (TFLOP/s)"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device, "note": note, "rows": rows}, fh, indent=2)
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
