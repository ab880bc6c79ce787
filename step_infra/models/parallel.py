"""Communication for the DiT's parallel dimensions, with groups passed in explicitly.

Why hand-written: megatron-core's tensor-parallel linears work on the CPU with gloo, but its
sequence-parallel region helpers allocate their buffers with ``torch.cuda.current_device()``
and its context-parallel attention lives in Transformer-Engine. The few autograd functions
that sequence and context parallelism need are therefore here, each an exact inverse pair
(forward op, backward op) over a group taken from :class:`ParallelGroups`.

``ParallelGroups`` is this rank's view of the :class:`~step_infra.topology.ProcessGrid`:
one object, created once, handed to every parallel module. Without ``torch.distributed`` a
single-rank stand-in group is used so the same model runs in one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from step_infra.topology import ProcessGrid, new_torch_groups


class SingleRankGroup:
    """Stands in for a process group of size 1 (megatron-core only asks for size and rank)."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


@dataclass(slots=True, kw_only=True)
class ParallelGroups:
    """The groups of one rank: tensor, context, data, pipeline parallel."""

    tp: Any
    cp: Any
    dp: Any
    pp: Any
    sequence_parallel: bool = False
    cp_kind: str = "ulysses"

    @property
    def tp_size(self) -> int:
        return int(self.tp.size())

    @property
    def cp_size(self) -> int:
        return int(self.cp.size())

    @property
    def dp_size(self) -> int:
        return int(self.dp.size())

    @property
    def pp_size(self) -> int:
        return int(self.pp.size())

    @property
    def cp_rank(self) -> int:
        return int(self.cp.rank())

    @property
    def pp_rank(self) -> int:
        return int(self.pp.rank())

    @property
    def tp_rank(self) -> int:
        return int(self.tp.rank())

    @classmethod
    def single(cls) -> ParallelGroups:
        """Groups for a one-process run."""
        one = SingleRankGroup()
        return cls(tp=one, cp=one, dp=one, pp=one)

    @classmethod
    def create(
        cls, grid: ProcessGrid, *, sequence_parallel: bool = False, cp_kind: str = "ulysses"
    ) -> ParallelGroups:
        """Create torch.distributed groups for ``grid`` (collective: call on every rank)."""
        if cp_kind not in ("ulysses", "ring"):
            raise ValueError(f"cp_kind must be 'ulysses' or 'ring', got {cp_kind!r}")
        mine = new_torch_groups(grid)
        return cls(
            tp=mine["tp"],
            cp=mine["cp"],
            dp=mine["dp"],
            pp=mine["pp"],
            sequence_parallel=sequence_parallel and grid.tp > 1,
            cp_kind=cp_kind,
        )


def _all_gather(x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(group.size())]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _split(x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    return x.chunk(group.size(), dim=dim)[group.rank()].contiguous()


class _Scatter(torch.autograd.Function):
    """Forward: keep this rank's slice along ``dim``. Backward: all-gather the slices."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _all_gather(grad, ctx.group, ctx.dim), None, None


class _Gather(torch.autograd.Function):
    """Forward: all-gather along ``dim``. Backward: sum over ranks (if the consumers of the
    gathered tensor differ per rank) or just slice (if every rank computed the same thing)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, dim: int, reduce_grad: bool) -> torch.Tensor:
        ctx.group, ctx.dim, ctx.reduce_grad = group, dim, reduce_grad
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        if ctx.reduce_grad:
            grad = grad.contiguous()
            dist.all_reduce(grad, group=ctx.group)
        return _split(grad, ctx.group, ctx.dim), None, None, None


class _AllReduceGrad(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce (sum) the gradient over the group."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _AllToAll(torch.autograd.Function):
    """Split ``scatter_dim`` over ranks and concatenate what arrives along ``gather_dim``."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, group: Any, scatter_dim: int, gather_dim: int
    ) -> torch.Tensor:
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def _all_to_all(x: torch.Tensor, group: Any, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    world = group.size()
    inputs = [t.contiguous() for t in x.chunk(world, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(world)]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


def scatter(x: torch.Tensor, group: Any, dim: int = 0) -> torch.Tensor:
    """This rank's slice of ``x`` along ``dim`` (gradients gathered back)."""
    return x if group.size() == 1 else _Scatter.apply(x, group, dim)


def gather(x: torch.Tensor, group: Any, dim: int = 0, *, reduce_grad: bool) -> torch.Tensor:
    """All ranks' slices concatenated along ``dim``.

    ``reduce_grad=True`` when each rank feeds the gathered tensor into different computation
    (e.g. its own heads), ``False`` when every rank computes the same loss from it.
    """
    return x if group.size() == 1 else _Gather.apply(x, group, dim, reduce_grad)


def all_reduce_grad(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Identity whose gradient is summed over ``group`` (a replicated input used on shards)."""
    return x if group.size() == 1 else _AllReduceGrad.apply(x, group)


def all_to_all(x: torch.Tensor, group: Any, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Differentiable all-to-all (Ulysses sequence <-> head exchange)."""
    return x if group.size() == 1 else _AllToAll.apply(x, group, scatter_dim, gather_dim)


def all_reduce_coalesced(tensors: list[torch.Tensor], group: Any) -> None:
    """Sum ``tensors`` over ``group`` in one flat all-reduce, in place.

    One message instead of one per tensor, as megatron-core coalesces the layer-norm gradients
    of sequence parallelism: the many small gradients are latency-bound, so their count, not
    their bytes, sets the cost.
    """
    if not tensors or group.size() == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def tp_partial_grads(model: torch.nn.Module, groups: ParallelGroups) -> list[torch.Tensor]:
    """Gradients of parameters marked ``tp_partial_grad`` (shared across the heads or sequence
    shards of a tensor-parallel group: each rank holds a partial sum); empty without TP."""
    if groups.tp_size == 1:
        return []
    return [
        p.grad
        for p in model.parameters()
        if p.grad is not None and getattr(p, "tp_partial_grad", False)
    ]


def finalize_grads(
    model: torch.nn.Module,
    groups: ParallelGroups,
    *,
    dp_mean: bool = True,
    ride_along: list[torch.Tensor] | None = None,
) -> None:
    """Reduce gradients after backward, as megatron-core's ``finalize_model_grads`` does.

    - parameters marked ``tp_partial_grad`` are summed over the tensor-parallel group;
    - every gradient is summed over the context-parallel group (each rank saw part of the
      sequence) and averaged over the data-parallel group (each rank saw part of the batch),
      or summed with ``dp_mean=False`` (when each rank already scaled its loss by the global
      batch, as the streaming job does: replicas may hold unequal shares);
    - ``ride_along`` tensors (e.g. the loss) are summed over data parallel in the same call.

    A trainable parameter without a gradient gets zeros first, so every rank contributes
    the same tensors to each coalesced all-reduce (a replica may have had no samples).
    """
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_coalesced(tp_partial_grads(model, groups), groups.tp)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if groups.cp_size > 1:
        all_reduce_coalesced(grads, groups.cp)
    extra = list(ride_along or [])
    if groups.dp_size > 1:
        all_reduce_coalesced([*grads, *extra], groups.dp)
        if dp_mean:
            for g in grads:
                g.div_(groups.dp_size)


def clip_grad_norm(model: torch.nn.Module, groups: ParallelGroups | None, max_norm: float) -> float:
    """Clip gradients by their global norm; returns the norm before clipping.

    Tensor-parallel shards (``tensor_model_parallel``) hold different parts of a parameter:
    their squares are summed over the TP group; replicated parameters are counted once.
    Pipeline ranks hold different parameters (``model`` is this rank's chunks): the squares
    are then summed over the PP group. On one rank (``groups`` None) this is
    ``torch.nn.utils.clip_grad_norm_``'s L2 clip. ``max_norm <= 0``: measure only.
    """
    tp = groups.tp_size if groups is not None else 1
    pp = groups.pp_size if groups is not None else 1
    device = next((p.grad.device for p in model.parameters() if p.grad is not None), None)
    sharded = torch.zeros(1, device=device)
    replicated = torch.zeros(1, device=device)
    for p in model.parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().square().sum()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            sharded += sq
        else:
            replicated += sq
    if tp > 1:
        assert groups is not None
        dist.all_reduce(sharded, group=groups.tp)
    total = sharded + replicated  # this stage's squared norm, the same on its TP ranks
    if pp > 1:
        assert groups is not None
        dist.all_reduce(total, group=groups.pp)
    norm = float(total.sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm
