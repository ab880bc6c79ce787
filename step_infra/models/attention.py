"""Self- and cross-attention of the DiT, assembled from megatron-core ``ModuleSpec`` parts.

Tensor parallelism comes from megatron-core's ``ColumnParallelLinear`` (fused QKV, heads
split across ranks) and ``RowParallelLinear`` (output projection, all-reduce). The core
attention is this project's own module because megatron-core's ``DotProductAttention``
needs CUDA; it calls :func:`step_infra.kernels.flash_attention` (Triton on GPU, SDPA on CPU).
Context parallelism is a choice of core attention: Ulysses (all-to-all sequence <-> heads)
or ring (K/V chunks passed rank to rank and attended in turn, partial results merged by
log-sum-exp; :mod:`step_infra.models.ring_attention`, re-exported here).

Layout inside the block is megatron's ``[seq, batch, hidden]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn

from step_infra.kernels import flash_attention
from step_infra.models import parallel
from step_infra.models.layers import init_parallel_linear_
from step_infra.models.parallel import ParallelGroups
from step_infra.models.ring_attention import RingAttention as RingAttention  # re-exported
from step_infra.models.rope import apply_rope


class LocalAttention(nn.Module):
    """Attention over the whole sequence held by this rank: ``[s, b, h, d] -> [s, b, h*d]``."""

    def __init__(self, *, groups: ParallelGroups) -> None:
        super().__init__()
        self.groups = groups

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = flash_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), kv_lengths=kv_lengths
        )
        assert isinstance(out, torch.Tensor)
        return out.transpose(0, 1).flatten(2)


class UlyssesAttention(LocalAttention):
    """Context parallel by all-to-all: each rank trades its sequence chunk of all (local)
    heads for the full sequence of ``heads / cp`` heads, attends, and trades back."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cp = self.groups.cp
        if q.shape[2] % cp.size():
            raise ValueError(
                f"Ulysses needs heads per rank ({q.shape[2]}) divisible by cp={cp.size()}"
            )
        q, k, v = (parallel.all_to_all(t, cp, scatter_dim=2, gather_dim=0) for t in (q, k, v))
        out = flash_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
        assert isinstance(out, torch.Tensor)
        out = parallel.all_to_all(out.transpose(0, 1), cp, scatter_dim=0, gather_dim=2)
        return out.flatten(2)


@dataclass
class SelfAttentionSubmodules:
    linear_qkv: ModuleSpec | type
    q_norm: ModuleSpec | type
    k_norm: ModuleSpec | type
    core_attention: ModuleSpec | type
    linear_proj: ModuleSpec | type


@dataclass
class CrossAttentionSubmodules:
    linear_q: ModuleSpec | type
    linear_kv: ModuleSpec | type
    q_norm: ModuleSpec | type
    k_norm: ModuleSpec | type
    core_attention: ModuleSpec | type
    linear_proj: ModuleSpec | type


def _mark_tp_partial(module: nn.Module) -> None:
    for p in module.parameters():
        p.tp_partial_grad = True  # type: ignore[attr-defined]


def _reset_norms(*norms: nn.Module) -> None:
    for norm in norms:  # deterministic (ones), no generator needed
        norm.reset_parameters()  # type: ignore[operator]


def _build_norms_core_proj(
    submodules: SelfAttentionSubmodules | CrossAttentionSubmodules,
    mcore_config: Any,
    num_heads: int,
    head_dim: int,
    eps: float,
    groups: ParallelGroups,
) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """The parts self- and cross-attention share: per-head q/k RMSNorm, the core attention and
    the row-parallel output projection (in that order)."""
    q_norm = build_module(submodules.q_norm, head_dim, eps=eps)
    k_norm = build_module(submodules.k_norm, head_dim, eps=eps)
    if groups.tp_size > 1:  # shared by the heads of all tensor-parallel ranks
        _mark_tp_partial(q_norm)
        _mark_tp_partial(k_norm)
    core = build_module(submodules.core_attention, groups=groups)
    proj = build_module(
        submodules.linear_proj,
        num_heads * head_dim,
        mcore_config.hidden_size,
        config=mcore_config,
        init_method=mcore_config.output_layer_init_method,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=False,
        tp_group=groups.tp,
    )
    return q_norm, k_norm, core, proj


class SelfAttention(nn.Module):
    """Fused QKV -> per-head RMSNorm(q, k) -> 3D RoPE -> core attention -> output projection."""

    def __init__(
        self,
        submodules: SelfAttentionSubmodules,
        *,
        mcore_config: Any,
        num_heads: int,
        head_dim: int,
        eps: float,
        groups: ParallelGroups,
    ) -> None:
        super().__init__()
        h = mcore_config.hidden_size
        tp = groups.tp_size
        if num_heads % tp:
            raise ValueError(f"num_heads {num_heads} is not divisible by tp={tp}")
        self.heads_local, self.head_dim = num_heads // tp, head_dim
        # Output rows are laid out [head, (q, k, v), head_dim] so that a column split gives
        # every tensor-parallel rank whole heads.
        self.linear_qkv = build_module(
            submodules.linear_qkv,
            h,
            3 * num_heads * head_dim,
            config=mcore_config,
            init_method=mcore_config.init_method,
            bias=False,
            gather_output=False,
            tp_group=groups.tp,
        )
        self.q_norm, self.k_norm, self.core_attention, self.linear_proj = _build_norms_core_proj(
            submodules, mcore_config, num_heads, head_dim, eps, groups
        )

    def init_weights(self, generator: torch.Generator, *, std: float, out_std: float) -> None:
        init_parallel_linear_(self.linear_qkv, std, generator)
        _reset_norms(self.q_norm, self.k_norm)
        init_parallel_linear_(self.linear_proj, out_std, generator)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:  # x: (S', B, hidden), S' = S, or S / tp with sequence parallel
        # The column linear returns this CP rank's full sequence S (gathered over TP with
        # sequence parallel) for this TP rank's heads; the output projection returns x's S'.
        qkv, _ = self.linear_qkv(x)  # (S, B, heads_local * 3 * D)
        s, b = qkv.shape[:2]
        q, k, v = qkv.view(s, b, self.heads_local, 3, self.head_dim).unbind(3)
        q = apply_rope(self.q_norm(q), *rope)
        k = apply_rope(self.k_norm(k), *rope)
        out = self.core_attention(q, k, v)  # (S, B, heads_local * D)
        y, _ = self.linear_proj(out)
        return y


class CrossAttention(nn.Module):
    """Queries from video tokens, keys/values from (padded) text tokens; no RoPE."""

    def __init__(
        self,
        submodules: CrossAttentionSubmodules,
        *,
        mcore_config: Any,
        text_config: Any,
        num_heads: int,
        head_dim: int,
        eps: float,
        groups: ParallelGroups,
    ) -> None:
        super().__init__()
        h = mcore_config.hidden_size
        tp = groups.tp_size
        self.heads_local, self.head_dim = num_heads // tp, head_dim
        self.linear_q = build_module(
            submodules.linear_q,
            h,
            num_heads * head_dim,
            config=mcore_config,
            init_method=mcore_config.init_method,
            bias=False,
            gather_output=False,
            tp_group=groups.tp,
        )
        # Text is replicated on every rank (never sequence-sharded): megatron's column linear
        # (``dit_layer_spec``) with its own config without sequence parallel, so the input
        # gradient is all-reduced over the TP group.
        self.linear_kv = build_module(
            submodules.linear_kv,
            h,
            2 * num_heads * head_dim,
            config=text_config,
            init_method=mcore_config.init_method,
            bias=False,
            gather_output=False,
            tp_group=groups.tp,
        )
        self.q_norm, self.k_norm, self.core_attention, self.linear_proj = _build_norms_core_proj(
            submodules, mcore_config, num_heads, head_dim, eps, groups
        )

    def init_weights(self, generator: torch.Generator, *, std: float, out_std: float) -> None:
        init_parallel_linear_(self.linear_q, std, generator)
        init_parallel_linear_(self.linear_kv, std, generator)
        _reset_norms(self.q_norm, self.k_norm)
        init_parallel_linear_(self.linear_proj, out_std, generator)

    def forward(
        self, x: torch.Tensor, text: torch.Tensor, text_lengths: torch.Tensor | None
    ) -> torch.Tensor:  # x: (S', B, hidden) as in SelfAttention, text: (L, B, hidden)
        q, _ = self.linear_q(x)  # (S, B, heads_local * D), full sequence of this CP rank
        kv, _ = self.linear_kv(text)
        s, b = q.shape[:2]
        q = self.q_norm(q.view(s, b, self.heads_local, self.head_dim))
        k, v = kv.view(kv.shape[0], b, self.heads_local, 2, self.head_dim).unbind(3)
        k = self.k_norm(k)
        out = self.core_attention(q, k, v, text_lengths)
        y, _ = self.linear_proj(out)
        return y
