"""Triton flash attention (interpreted on the CPU) against the fp64 reference.

Tolerances: the kernel accumulates in fp32 and rounds its output to the input dtype; against
an fp64 reference fp32 inputs agree to ~1e-5 (reduction order), fp16 inputs to ~1e-3 relative
(10-bit mantissa of the stored output and of P cast to fp16 before P @ V). Gradients see the
same roundings twice (forward recompute and backward), so their bounds are 2-3x wider.
"""

from __future__ import annotations

import pytest
import torch

from step_infra.kernels import flash_attention
from step_infra.kernels.dispatch import choose_backend
from step_infra.kernels.flash_attention import attention_reference, flash_attention_triton

TOL = {
    torch.float32: (2e-5, 5e-5),
    torch.float16: (2e-3, 6e-3),
}  # (forward, gradients), relative to max


def _inputs(b: int, sq: int, sk: int, h: int, d: int, dtype: torch.dtype, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g).to(dtype).requires_grad_() for s in (sq, sk, sk)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize(
    ("b", "sq", "sk", "h", "d", "causal", "lengths"),
    [
        (1, 37, 37, 2, 16, False, None),  # odd length: masked tail blocks
        (2, 21, 45, 2, 32, False, [45, 7]),  # unequal q/k lengths, padded keys (cross-attention)
        (1, 33, 33, 1, 64, True, None),  # causal
        (2, 19, 30, 1, 16, True, [30, 25]),  # causal, bottom-right aligned, with padding
        (1, 20, 20, 1, 128, False, [13]),  # Step-Video's head dim, padded keys
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_and_gradients_match_fp64_reference(
    b, sq, sk, h, d, causal, lengths, dtype
) -> None:  # type: ignore[no-untyped-def]
    q, k, v = _inputs(b, sq, sk, h, d, dtype)
    kv_lengths = torch.tensor(lengths) if lengths is not None else None
    out, lse = flash_attention_triton(
        q, k, v, kv_lengths=kv_lengths, causal=causal, return_lse=True
    )
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_reference(
        q64, k64, v64, kv_lengths=kv_lengths, causal=causal, return_lse=True
    )
    fwd_tol, grad_tol = TOL[dtype]
    assert _rel(out, ref) < fwd_tol
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert _rel(lse[finite], ref_lse[finite]) < fwd_tol
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    for mine, theirs in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert mine is not None and theirs is not None
        assert _rel(mine, theirs) < grad_tol


def test_fully_masked_rows_give_zero_and_minus_inf() -> None:
    q, k, v = _inputs(2, 8, 8, 1, 16, torch.float32)
    out, lse = flash_attention_triton(q, k, v, kv_lengths=torch.tensor([8, 0]), return_lse=True)
    assert torch.all(out[1] == 0) and torch.all(torch.isinf(lse[1]))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_custom_scale_and_non_contiguous_inputs() -> None:
    base = torch.randn(1, 2, 20, 16)  # (B, H, S, D) -> transposed views are non-contiguous
    q, k, v = (base.transpose(1, 2) for _ in range(3))
    out = flash_attention_triton(q, k, v, softmax_scale=0.3)
    ref = attention_reference(q.double(), k.double(), v.double(), softmax_scale=0.3)
    assert _rel(out, ref) < 2e-5


def test_dispatcher_chooses_reference_on_cpu_and_triton_when_forced() -> None:
    q, k, v = _inputs(1, 10, 10, 1, 16, torch.float32)
    assert choose_backend(q) == "reference"
    assert choose_backend(q, "triton") == "triton"
    forced = flash_attention(q, k, v, backend="triton")
    auto = flash_attention(q, k, v)
    assert _rel(forced, auto) < 2e-5
    with pytest.raises(ValueError, match="backend='cuda'"):
        flash_attention(q, k, v, backend="cuda")  # type: ignore[arg-type]


def test_shape_errors_name_the_shapes() -> None:
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match=r"\(1, 4, 2, 8\)"):
        flash_attention_triton(q, torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8))
    with pytest.raises(ValueError, match="kv_lengths must have shape"):
        flash_attention_triton(q, q, q, kv_lengths=torch.tensor([1, 2]))


@pytest.mark.integration
@pytest.mark.parametrize("name", ["attention", "fused_elementwise"])
def test_kernel_benchmarks_run_and_write_json(tmp_path, name: str) -> None:  # type: ignore[no-untyped-def]
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    out = tmp_path / "a.json"
    done = subprocess.run(
        [sys.executable, str(script), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert rows
    for row in rows:  # every timed figure is a positive rate
        assert all(v > 0 for k, v in row.items() if k.endswith(("_tflops", "_gb_s")))
