"""Full-size kernel checks on a CUDA device (marked gpu: skipped, with the reason printed, on CPU).

Step-Video shapes: head dim 128, 48 heads, a 75,888-token self-attention (not a multiple of any
block size) in bf16, and cross-attention to 397 padded text tokens. bf16 keeps 8 mantissa bits,
so against an fp32 reference outputs agree to ~1e-2 relative (P is rounded to bf16 before P @ V).
"""

from __future__ import annotations

import pytest
import torch

from step_infra.kernels import adaln_modulate, gated_residual
from step_infra.kernels.adaln import adaln_modulate_reference, gated_residual_reference
from step_infra.kernels.flash_attention import attention_reference, flash_attention_triton

pytestmark = pytest.mark.gpu


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize(
    ("sq", "sk", "lengths"), [(75_888, 75_888, None), (8_192, 397, [397, 120])]
)
def test_flash_attention_full_size_bf16(sq: int, sk: int, lengths: list[int] | None) -> None:
    q = torch.randn(1 if lengths is None else 2, sq, 48, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(q.shape[0], sk, 48, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kv = torch.tensor(lengths, device="cuda") if lengths else None
    out = flash_attention_triton(q, k, v, kv_lengths=kv)
    # reference on a slice of queries (the full score matrix would not fit)
    ref = attention_reference(q[:, :512].float(), k.float(), v.float(), kv_lengths=kv)
    assert _rel(out[:, :512], ref) < 2e-2


def test_elementwise_full_size_bf16() -> None:
    x = torch.randn(1, 75_888, 6144, device="cuda", dtype=torch.bfloat16)
    shift, scale, gate = (
        torch.randn(1, 6144, device="cuda", dtype=torch.bfloat16) for _ in range(3)
    )
    assert (
        _rel(
            adaln_modulate(x, shift, scale),
            adaln_modulate_reference(x.float(), shift.float(), scale.float()),
        )
        < 2e-2
    )
    assert (
        _rel(
            gated_residual(x, gate, x), gated_residual_reference(x.float(), gate.float(), x.float())
        )
        < 2e-2
    )
