"""Context and sequence parallelism for a built DiT: shard the token sequence, gather it back.

torchtitan's model / parallelize split: ``dit.py`` describes the model, with its tensor
parallelism in the blocks' ModuleSpecs; this step decides which tokens each rank holds. It
hooks the DiT's stages instead of changing their code:

- before ``embed``: with CP, keep this rank's contiguous chunk of the tokens and their RoPE
  angles (gradients then stay partial per CP rank, summed by ``finalize_grads``);
- after ``embed``: with SP, keep this TP rank's slice of the chunk for the blocks, and make the
  replicated conditioning (``t_mod``, ``temb``) sum its gradient over the TP group, since each
  rank now uses it on its own slice only;
- after ``head``: gather the slices back (SP over TP, then CP), so every rank returns the
  full prediction. The head's parameters then see one slice per TP rank, so they are marked
  ``tp_partial_grad`` (summed over TP after backward).

The blocks themselves need nothing here: they were built for the same groups (the core
attention exchanges the CP chunks, the sequence-parallel linears gather the SP slices on
the way into each sublayer and reduce-scatter them on the way out).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from step_infra.models import parallel
from step_infra.models.parallel import ParallelGroups

if TYPE_CHECKING:
    from step_infra.models.dit import DiT


def sequence_split(groups: ParallelGroups) -> int:
    """Ranks the token sequence is split over: ``cp``, times ``tp`` with sequence parallel."""
    return groups.cp_size * (groups.tp_size if groups.sequence_parallel else 1)


def parallelize(model: DiT, groups: ParallelGroups) -> DiT:
    """Shard ``model``'s token sequence over ``groups`` (in place; returns ``model``).

    ``model`` must have been built for the same ``groups`` (``build_dit(..., groups=groups)``,
    which calls this). Nothing is hooked when the sequence is not split.
    """
    built, wanted = _layout(model.groups), _layout(groups)
    if built != wanted:
        raise ValueError(
            f"the DiT was built for (tp, cp, sequence_parallel, cp_kind) = {built} but is "
            f"parallelized for {wanted}; build it with the same groups (build_dit(..., groups=))"
        )
    if getattr(model, "_sequence_split", 1) != 1:
        raise ValueError("this DiT is already parallelized; call parallelize once per model")
    split = sequence_split(groups)
    if split == 1:
        return model
    setattr(model, "_sequence_split", split)  # noqa: B010 (not a DiT attribute)
    model.embed.register_forward_pre_hook(partial(_shard_tokens, groups))
    if groups.sequence_parallel:
        model.embed.register_forward_hook(partial(_scatter_over_tp, groups))
        for p in model.head.parameters():  # each TP rank sees one slice of the sequence
            p.tp_partial_grad = True  # type: ignore[attr-defined]
    model.head.register_forward_hook(partial(_gather_tokens, groups))
    return model


def _layout(groups: ParallelGroups) -> tuple[int, int, bool, str]:
    return groups.tp_size, groups.cp_size, groups.sequence_parallel, groups.cp_kind


def _shard_tokens(groups: ParallelGroups, _: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``embed``'s inputs ``(tokens (B, S, C p p), (cos, sin) (S, ...), ...)`` -> this CP
    rank's contiguous chunk of both (checks that every rank gets as many tokens)."""
    tokens, (cos, sin), *rest = args
    seq, split = tokens.shape[1], sequence_split(groups)
    if seq % split:
        raise ValueError(f"{seq} tokens do not split evenly over cp x sp = {split} ranks")
    if groups.cp_size > 1:
        n, r = groups.cp_size, groups.cp_rank
        tokens = tokens.chunk(n, dim=1)[r]
        cos, sin = cos.chunk(n)[r], sin.chunk(n)[r]
    return (tokens, (cos, sin), *rest)


def _scatter_over_tp(
    groups: ParallelGroups, _: nn.Module, args: tuple[Any, ...], output: tuple[torch.Tensor, Any]
) -> tuple[torch.Tensor, Any]:
    """``embed``'s output ``(h (S, B, h), cond)`` -> this TP rank's slice of ``h``; the
    conditioning stays whole, its gradient summed over TP."""
    h, cond = output
    tp = groups.tp
    cond = dataclasses.replace(
        cond,
        t_mod=parallel.all_reduce_grad(cond.t_mod, tp),
        temb=parallel.all_reduce_grad(cond.temb, tp),
    )
    # A dim-0 slice is a contiguous view (``.contiguous()`` does not copy it): clone it, or
    # the first block's saved norm input would keep the whole (S, B, h) tensor alive.
    return parallel.scatter(h, tp, dim=0).clone(), cond


def _gather_tokens(
    groups: ParallelGroups, _: nn.Module, args: tuple[Any, ...], out: torch.Tensor
) -> torch.Tensor:
    """``head``'s output ``(S_local, B, C p p)`` -> the full sequence on every rank. Every rank
    computes the same loss from it, so the backward only slices (no reduction)."""
    if groups.sequence_parallel:
        out = parallel.gather(out, groups.tp, dim=0, reduce_grad=False)
    if groups.cp_size > 1:
        out = parallel.gather(out, groups.cp, dim=0, reduce_grad=False)
    return out
