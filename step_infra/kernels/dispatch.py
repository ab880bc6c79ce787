"""Choose the attention implementation for the device the tensors live on.

Triton kernels on CUDA; on the CPU the PyTorch reference (SDPA, or an explicit softmax when
masks or the log-sum-exp are asked for) by default, and the Triton kernels through the
interpreter when ``backend="triton"`` is forced under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

from typing import Literal

import torch

from step_infra.kernels.flash_attention import attention_reference, flash_attention_triton

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
