"""Fused adaLN and gated residual (interpreted) against their fp64 references.

Tolerances: statistics and sums in fp32, so fp32 inputs agree with fp64 to ~1e-5 relative;
fp16 outputs round to a 10-bit mantissa (~1e-3 relative)."""

from __future__ import annotations

import pytest
import torch

from step_infra.kernels.adaln import (
    adaln_modulate,
    adaln_modulate_reference,
    gated_residual,
    gated_residual_reference,
)

TOL = {torch.float32: 3e-5, torch.float16: 3e-3}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [48, 64])  # 48: masked tail of the row block
def test_adaln_forward_and_gradients(dtype: torch.dtype, hidden: int) -> None:
    g = torch.Generator().manual_seed(1)
    x, shift, scale = (
        torch.randn(*shape, generator=g).to(dtype).requires_grad_()
        for shape in ((2, 7, hidden), (2, hidden), (2, hidden))
    )
    ref_in = [t.detach().double().requires_grad_() for t in (x, shift, scale)]
    out = adaln_modulate(x, shift, scale)
    ref = adaln_modulate_reference(*ref_in)
    assert _rel(out, ref) < TOL[dtype]
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    for mine, theirs in zip((x, shift, scale), ref_in, strict=True):
        assert _rel(mine.grad, theirs.grad) < 3 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gated_residual_forward_and_gradients(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    x, gate, y = (
        torch.randn(*shape, generator=g).to(dtype).requires_grad_()
        for shape in ((2, 5, 40), (2, 40), (2, 5, 40))
    )
    ref_in = [t.detach().double().requires_grad_() for t in (x, gate, y)]
    out = gated_residual(x, gate, y)
    ref = gated_residual_reference(*ref_in)
    assert _rel(out, ref) < TOL[dtype]
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    for mine, theirs in zip((x, gate, y), ref_in, strict=True):
        assert _rel(mine.grad, theirs.grad) < 3 * TOL[dtype]


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"shift must be \[batch, hidden\]"):
        adaln_modulate(torch.randn(2, 3, 8), torch.randn(3, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match="must match x"):
        gated_residual(torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 4, 8))
