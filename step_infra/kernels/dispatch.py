"""Choose the attention implementation for the device the tensors live on.

On the CPU the reference (PyTorch SDPA, or an explicit softmax when the log-sum-exp is asked
for) is used. The Triton kernels replace it on CUDA as they land.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    kv_lengths: torch.Tensor | None = None,
    causal: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over ``[batch, seq, heads, head_dim]`` tensors; differentiable.

    ``kv_lengths`` (``[batch]`` int) masks key positions ``>= kv_lengths[b]`` (padded text).
    With ``return_lse`` also returns the log-sum-exp ``[batch, heads, seq_q]`` in fp32.
    """
    return attention_reference(
        q,
        k,
        v,
        softmax_scale=softmax_scale,
        kv_lengths=kv_lengths,
        causal=causal,
        return_lse=return_lse,
    )


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    kv_lengths: torch.Tensor | None = None,
    causal: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch attention: SDPA when no LSE is needed, an explicit softmax otherwise."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [batch, seq, heads, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    mask = _mask(q.shape[1], k.shape[1], kv_lengths, causal, q.device)
    if not return_lse:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
        return out.transpose(1, 2)
    scores = (qh.float() @ kh.float().transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Sq)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = (probs @ vh.float()).to(q.dtype)
    return out.transpose(1, 2), lse


def _mask(
    seq_q: int, seq_k: int, kv_lengths: torch.Tensor | None, causal: bool, device: torch.device
) -> torch.Tensor | None:
    """Boolean keep-mask broadcastable to (B, H, Sq, Sk), or None when nothing is masked."""
    mask = None
    if kv_lengths is not None:
        keys = torch.arange(seq_k, device=device)
        mask = (keys[None, :] < kv_lengths.to(device)[:, None])[:, None, None, :]  # (B, 1, 1, Sk)
    if causal:
        tri = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device).tril(seq_k - seq_q)
        mask = tri if mask is None else mask & tri
    return mask
