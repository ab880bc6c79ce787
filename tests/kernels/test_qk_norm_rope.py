"""Fused q/k RMSNorm + 3D RoPE (interpreted) against the fp64 reference and the models' RoPE.

Tolerances as for the other element-wise kernels: fp32 statistics, ~1e-5 relative for fp32
inputs, ~1e-3 for fp16 (output rounding)."""

from __future__ import annotations

import pytest
import torch

from step_infra.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference
from step_infra.models.rope import apply_rope, rope_angles, rope_cos_sin


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 3e-5), (torch.float16, 3e-3)])
def test_forward_and_gradients_match_reference(dtype: torch.dtype, tol: float) -> None:
    g = torch.Generator().manual_seed(3)
    grid, split = (2, 3, 2), (8, 4, 4)  # 12 tokens, head dim 16 split over (f, h, w)
    angles = rope_angles(grid, split)
    x = torch.randn(12, 2, 3, 16, generator=g).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(16, generator=g)).to(dtype).requires_grad_()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    out = qk_norm_rope(x, w, angles)
    ref = qk_norm_rope_reference(x64, w64, angles.double())
    assert _rel(out, ref) < tol
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    assert _rel(x.grad, x64.grad) < 3 * tol
    assert _rel(w.grad, w64.grad) < 3 * tol


def test_reference_agrees_with_models_rope() -> None:
    """The fused op is a drop-in for the models' RMSNorm followed by ``apply_rope``."""
    angles = rope_angles((2, 2, 2), (4, 2, 2))
    x, w = torch.randn(8, 1, 2, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    cos, sin = rope_cos_sin(angles.double())
    normed = torch.nn.functional.rms_norm(x, (8,), w, eps=1e-6)
    # apply_rope computes in fp32 (x.float()), so the two agree to fp32 rounding, not fp64
    assert _rel(qk_norm_rope_reference(x, w, angles.double()), apply_rope(normed, cos, sin)) < 1e-6


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="angles"):
        qk_norm_rope(torch.randn(4, 1, 1, 8), torch.ones(8), torch.zeros(3, 4))
