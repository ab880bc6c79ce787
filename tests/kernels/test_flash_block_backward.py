"""The backward pieces ring attention needs: gradients through the LSE and one block's backward.

The Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``)
at tiny fp32 shapes (the interpreter runs a kernel as Python, about a second per launch here).
Tolerances as in ``test_flash_attention.py``: fp32 against fp64 differs only in reduction order,
~1e-6 relative to the largest value; 5e-5 leaves margin while any wrong term (a missing
``dlse``, an LSE not subtracted) gives errors of order 1.
"""

from __future__ import annotations

import pytest
import torch

from step_infra.kernels.dispatch import flash_attention_block_backward
from step_infra.kernels.flash_attention import (
    attention_block_backward_reference,
    flash_attention_block_backward_triton,
    flash_attention_triton,
)

TOL = 5e-5  # fp32 kernel against fp64 reference, relative to the largest reference value


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _attention64(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its LSE in fp64 throughout (``attention_reference`` computes its LSE path
    in fp32), ``[b, s, h, d]`` in and out; differentiable."""
    qh, kh, vh = (t.double().transpose(1, 2) for t in (q, k, v))
    scores = qh @ kh.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, H, Sq, Sk)
    if kv_lengths is not None:
        keep = torch.arange(k.shape[1])[None, :] < kv_lengths[:, None]  # (B, Sk)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ vh
    return out.transpose(1, 2), lse


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize(("sq", "sk", "lengths"), [(16, 16, None), (12, 20, [20])])
def test_gradient_through_lse_matches_fp64_reference(sq: int, sk: int, lengths) -> None:  # type: ignore[no-untyped-def]
    q, k, v = (_rand(1, s, 2, 16, seed=i).requires_grad_() for i, s in enumerate((sq, sk, sk)))
    kv_lengths = torch.tensor(lengths) if lengths is not None else None
    g_out, g_lse = _rand(1, sq, 2, 16, seed=10), _rand(1, 2, sq, seed=11)
    out, lse = flash_attention_triton(q, k, v, kv_lengths=kv_lengths, return_lse=True)
    ((out * g_out).sum() + (lse * g_lse).sum()).backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = _attention64(q64, k64, v64, kv_lengths)
    ((ref * g_out.double()).sum() + (ref_lse * g_lse.double()).sum()).backward()
    for mine, theirs in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert mine is not None and theirs is not None
        assert _rel(mine, theirs) < TOL


def _two_block_problem() -> tuple[torch.Tensor, ...]:
    """q against keys split into two blocks; the global lse/delta of the whole attention, and
    the fp64 autograd gradients of that attention (what the blocks must add up to)."""
    b, sq, h, d = 1, 16, 2, 16
    q = _rand(b, sq, h, d, seed=0).double().requires_grad_()
    k = _rand(b, 2 * sq, h, d, seed=1).double().requires_grad_()
    v = _rand(b, 2 * sq, h, d, seed=2).double().requires_grad_()
    dout = _rand(b, sq, h, d, seed=3).double()
    out, lse = _attention64(q, k, v)
    out.backward(dout)
    delta = (dout * out.detach()).sum(-1).transpose(1, 2)  # (B, H, Sq)
    return q, k, v, dout, lse.detach(), delta


def test_reference_blocks_add_up_to_the_full_gradient() -> None:
    q, k, v, dout, lse, delta = _two_block_problem()
    parts = [
        attention_block_backward_reference(q.detach(), kb, vb, dout, lse, delta)
        for kb, vb in zip(k.detach().chunk(2, dim=1), v.detach().chunk(2, dim=1), strict=True)
    ]
    assert q.grad is not None and k.grad is not None and v.grad is not None
    assert _rel(parts[0][0] + parts[1][0], q.grad) < 1e-12
    assert _rel(torch.cat([parts[0][1], parts[1][1]], dim=1), k.grad) < 1e-12
    assert _rel(torch.cat([parts[0][2], parts[1][2]], dim=1), v.grad) < 1e-12


def test_triton_block_backward_matches_reference() -> None:
    q, k, v, dout, lse, delta = _two_block_problem()
    kb, vb = k.detach()[:, 16:], v.detach()[:, 16:]  # the second block, a strided view
    ref = attention_block_backward_reference(q.detach(), kb, vb, dout, lse, delta)
    fp32 = [t.float() for t in (q.detach(), kb, vb, dout, lse, delta)]
    mine = flash_attention_block_backward_triton(*fp32)
    forced = flash_attention_block_backward(*fp32, backend="triton")
    for a, f, r in zip(mine, forced, ref, strict=True):
        assert a.dtype == torch.float32
        assert _rel(a, r) < TOL
        assert torch.equal(a, f)


def test_block_backward_shape_errors_name_the_shapes() -> None:
    q = torch.randn(1, 4, 2, 8)
    lse = torch.randn(1, 2, 4)
    with pytest.raises(ValueError, match=r"lse must be .*\(1, 2, 4\), got \(1, 4, 2\)"):
        flash_attention_block_backward(q, q, q, q, lse.transpose(1, 2), lse)
    with pytest.raises(ValueError, match=r"dout \(1, 4, 2, 4\)"):
        flash_attention_block_backward(q, q, q, q[..., :4], lse, lse)
