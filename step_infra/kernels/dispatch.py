"""Choose the attention implementation for the device the tensors live on.

Triton kernels on CUDA; on the CPU the PyTorch reference (SDPA, or an explicit softmax when
masks or the log-sum-exp are asked for) by default, and the Triton kernels through the
interpreter when ``backend="triton"`` is forced under ``TRITON_INTERPRET=1`` (tests). The
same choice is made for the per-block backward that ring attention calls.
"""

from __future__ import annotations

from typing import Literal

import torch

from step_infra.kernels.flash_attention import (
    attention_block_backward_reference,
    attention_reference,
    flash_attention_block_backward_triton,
    flash_attention_triton,
)

Backend = Literal["auto", "triton", "reference"]


def choose_backend(q: torch.Tensor, backend: Backend = "auto") -> Literal["triton", "reference"]:
    """``auto`` -> Triton on CUDA, the reference elsewhere."""
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend={backend!r}; expected 'auto', 'triton' or 'reference'")
    if backend == "auto":
        return "triton" if q.is_cuda else "reference"
    return backend


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    kv_lengths: torch.Tensor | None = None,
    causal: bool = False,
    return_lse: bool = False,
    backend: Backend = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over ``[batch, seq, heads, head_dim]`` tensors; differentiable.

    ``kv_lengths`` (``[batch]`` int) masks key positions ``>= kv_lengths[b]`` (padded text).
    With ``return_lse`` also returns the log-sum-exp ``[batch, heads, seq_q]`` in fp32.
    """
    impl = flash_attention_triton if choose_backend(q, backend) == "triton" else attention_reference
    return impl(
        q,
        k,
        v,
        softmax_scale=softmax_scale,
        kv_lengths=kv_lengths,
        causal=causal,
        return_lse=return_lse,
    )


def flash_attention_block_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` in fp32 of one K/V block of a larger attention (ring attention).

    ``q``, ``dout`` ``[batch, seq_q, heads, head_dim]``; ``k``, ``v`` the block
    ``[batch, seq_k, heads, head_dim]``; ``lse`` and ``delta = rowsum(dout * out)`` fp32
    ``[batch, heads, seq_q]`` of the attention over *all* blocks, so that
    ``P = exp(q k^T * scale - lse)`` is this block's share of the global softmax. No masks.
    """
    if choose_backend(q, backend) == "triton":
        impl = flash_attention_block_backward_triton
    else:
        impl = attention_block_backward_reference
    return impl(q, k, v, dout, lse, delta, softmax_scale=softmax_scale)
