"""Data-parallel gradient reduction in buckets, overlapped with the backward.

What megatron-core's ``DistributedDataParallel`` does, written here because megatron's needs
CUDA tensors and torch's ``DistributedDataParallel`` wraps the module (changing parameter
names) and reduces over one group only. :class:`GradReducer` sums gradients over the
data-parallel x context-parallel group (all ranks that share this rank's tensor- and
pipeline-parallel coordinates, :func:`make_dp_cp_group`): each rank saw part of the batch
(dp) or part of the sequence (cp), and either way the gradients add.

How, and why:

- Parameters are packed, in reverse registration order (roughly the order the backward
  produces their gradients), into buckets of about ``bucket_mb`` MiB of one dtype and device.
  A ``register_post_accumulate_grad_hook`` counts each parameter's gradient in; when a
  bucket is complete its gradients are copied into the bucket's flat buffer and one
  ``all_reduce(async_op=True)`` starts, so the communication runs while the backward goes
  on computing earlier layers (the emulator's ``overlap_grad_reduce``).
- Buckets are launched strictly in index order, as torch's DDP reducer does: a bucket that is
  ready before an earlier one waits for it. Every rank then issues the same collectives in
  the same order even when the backward's order differs between ranks (a parameter unused on
  one rank, a rank without samples), which process groups require.
- :meth:`GradReducer.finish` gives zeros to parameters without a gradient and launches
  whatever is left (a replica that had no samples still contributes, so collectives match),
  waits, writes the sums back into ``p.grad``, divides by the dp size if ``dp_mean``, and then
  sums the ``tp_partial_grad`` gradients over tensor parallelism in one coalesced message,
  exactly what :func:`~step_infra.models.parallel.finalize_grads` computes (only the order of
  the additions can differ: dp x cp in one all-reduce, then tp; ~1e-7 relative).
- Gradient accumulation: backwards run inside :meth:`GradReducer.no_sync` only accumulate;
  the last micro-batch's backward, outside it, triggers the reduction (DDP's ``no_sync``).

Copying into a flat buffer costs two memory passes over the gradients; in exchange ``p.grad``
stays an ordinary tensor, whatever ``zero_grad(set_to_none=...)`` the trainer uses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from step_infra.models.parallel import ParallelGroups, SingleRankGroup, all_reduce_coalesced
from step_infra.topology import ProcessGrid

log = logging.getLogger(__name__)

MIB = 1024 * 1024


def dp_cp_ranks(grid: ProcessGrid) -> list[list[int]]:
    """Every data x context-parallel group of ``grid``: the ranks sharing (pp, tp), ordered
    by (dp, cp). One list per (pp, tp) pair, in that order."""
    return [
        [grid.rank_of(dp=d, pp=p, cp=c, tp=t) for d in range(grid.dp) for c in range(grid.cp)]
        for p in range(grid.pp)
        for t in range(grid.tp)
    ]


def make_dp_cp_group(grid: ProcessGrid, backend: str | None = None) -> Any:
    """This rank's data x context-parallel group (collective: call on every rank, once).

    ``torch.distributed.new_group`` must be called by all ranks for every group in the same
    order, so all groups are created and this rank keeps its own. A grid with ``dp * cp ==
    1`` needs no communication: a single-rank stand-in is returned without creating groups.
    """
    if grid.dp * grid.cp == 1:
        return SingleRankGroup()
    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialized; call init_process_group first")
    if dist.get_world_size() != grid.world_size:
        raise ValueError(
            f"grid {grid.shape} needs {grid.world_size} ranks, world has {dist.get_world_size()}"
        )
    rank, mine = dist.get_rank(), None
    for ranks in dp_cp_ranks(grid):
        group = dist.new_group(ranks, backend=backend)
        if rank in ranks:
            mine = group
    assert mine is not None, "every rank is in one dp x cp group"
    return mine


@dataclass(slots=True, eq=False)
class _Bucket:
    """Parameters whose gradients travel in one flat all-reduce."""

    params: list[nn.Parameter]
    offsets: list[int]
    buffer: torch.Tensor
    pending: int = 0  # gradients not ready yet in this backward
    work: Any = None  # the async all-reduce in flight
    launched_in_backward: bool = False

    def reset(self) -> None:
        self.pending, self.work, self.launched_in_backward = len(self.params), None, False


@dataclass(slots=True)
class ReducerStats:
    """What the last :meth:`GradReducer.finish` saw (for telemetry and tests)."""

    buckets: int = 0
    launched_in_backward: int = 0  # started by a hook, i.e. overlapped with the backward
    launched_in_finish: int = 0  # started by finish (no_sync, unused parameters, no samples)
    zero_filled: list[str] = field(default_factory=list)  # parameters without a gradient


def _parameters(modules_or_params: Any) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters, deduplicated, in registration order, with names for errors."""
    items: list[Any] = (
        [modules_or_params]
        if isinstance(modules_or_params, nn.Module | torch.Tensor)
        else list(modules_or_params)
    )
    out: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for i, item in enumerate(items):
        if isinstance(item, nn.Module):
            named: Iterable[tuple[str, Any]] = item.named_parameters()
        elif isinstance(item, torch.Tensor):
            named = [(f"param{i}", item)]
        else:
            raise ValueError(
                f"GradReducer takes modules or parameters; item {i} is {type(item).__name__}"
            )
        for name, p in named:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append((name, p))
    if not out:
        raise ValueError("GradReducer got no trainable parameters (requires_grad=True)")
    return out


class GradReducer:
    """Bucketed gradient sum over the dp x cp group, launched from backward hooks.

    ``groups`` supplies the tensor-parallel group (``tp_partial_grad`` gradients) and the
    data-parallel group and size (``ride_along`` tensors, ``dp_mean``); ``dp_cp_group`` is
    :func:`make_dp_cp_group`'s. ``dp_mean=False`` sums over replicas (each already scaled
    its loss by the global batch, as the streaming trainer does); ``True`` averages over dp.
    Usage, every step, on every rank::

        for mb in micro_batches[:-1]:
            with reducer.no_sync():
                loss(mb).backward()
        loss(micro_batches[-1]).backward()     # buckets start during this backward
        reducer.finish(ride_along=[loss_sum])  # collective, also with no micro-batch at all
    """

    def __init__(
        self,
        modules_or_params: nn.Module | Iterable[nn.Module | nn.Parameter],
        groups: ParallelGroups,
        dp_cp_group: Any,
        *,
        bucket_mb: float = 25.0,
        dp_mean: bool = False,
    ) -> None:
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0 (MiB per bucket), got {bucket_mb!r}")
        self.groups, self.group, self.dp_mean = groups, dp_cp_group, dp_mean
        self.group_size = int(dp_cp_group.size())
        expected = groups.dp_size * groups.cp_size
        if self.group_size != expected:
            raise ValueError(
                f"dp_cp_group has {self.group_size} ranks but groups say dp x cp = "
                f"{groups.dp_size} x {groups.cp_size} = {expected}; build it with "
                "make_dp_cp_group(grid) from the same grid"
            )
        named = _parameters(modules_or_params)
        self._names = {id(p): n for n, p in named}
        self.params = [p for _, p in named]
        self.buckets = self._make_buckets(self.params[::-1], int(bucket_mb * MIB))
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b.params}
        self._ready: set[int] = set()
        self._accumulated: dict[int, int] = {}
        self._expected = 1  # backwards each gradient takes per step (see expect_accumulations)
        self._next = 0  # index of the next bucket to launch
        self._sync = True
        self.stats = ReducerStats(buckets=len(self.buckets))
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in self.params]

    @staticmethod
    def _make_buckets(params: list[nn.Parameter], cap_bytes: int) -> list[_Bucket]:
        buckets: list[_Bucket] = []
        group: list[nn.Parameter] = []

        def close() -> None:
            if not group:
                return
            offsets, total = [], 0
            for p in group:
                offsets.append(total)
                total += p.numel()
            buf = torch.zeros(total, dtype=group[0].dtype, device=group[0].device)
            buckets.append(_Bucket(params=list(group), offsets=offsets, buffer=buf))
            buckets[-1].reset()
            group.clear()

        size = 0
        for p in params:
            if group and (p.dtype, p.device) != (group[0].dtype, group[0].device):
                close()
                size = 0
            group.append(p)
            size += p.numel() * p.element_size()
            if size >= cap_bytes:
                close()
                size = 0
        close()
        return buckets

    # ------------------------------------------------------------------ during the backward
    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backwards inside only accumulate gradients (all but the last micro-batch)."""
        before, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = before

    def expect_accumulations(self, n: int) -> None:
        """This step's gradients each accumulate ``n`` backwards before they are complete
        (a pipeline schedule runs one per micro-batch, where ``no_sync`` cannot reach): a
        bucket starts once all its gradients got their ``n``-th. Reset to 1 by ``finish``."""
        if n < 1:
            raise ValueError(f"expect_accumulations needs n >= 1, got {n!r}")
        if self._accumulated or self._ready:
            raise RuntimeError("expect_accumulations must be called before the step's backwards")
        self._expected = n

    def _grad_ready(self, p: torch.Tensor) -> None:
        key = id(p)
        if self._sync and self._expected > 1:
            count = self._accumulated.get(key, 0) + 1
            self._accumulated[key] = count
            if count < self._expected:
                return
        if not self._sync:
            if self._next > 0:
                raise RuntimeError(
                    f"gradient of {self._names[key]} accumulated inside no_sync() after "
                    "buckets were already reduced in this step; call finish() first"
                )
            return
        if key in self._ready:
            raise RuntimeError(
                f"gradient of {self._names[key]} became ready twice before finish(): run "
                "all but the last micro-batch's backward inside reducer.no_sync()"
            )
        self._ready.add(key)
        bucket = self.buckets[self._bucket_of[key]]
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch_ready(in_backward=True)

    def _launch_ready(self, *, in_backward: bool) -> None:
        """Launch completed buckets in index order (the same order on every rank)."""
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            bucket = self.buckets[self._next]
            for p, off in zip(bucket.params, bucket.offsets, strict=True):
                assert p.grad is not None
                bucket.buffer[off : off + p.numel()].copy_(p.grad.reshape(-1))
            if self.group_size > 1:
                bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
            bucket.launched_in_backward = in_backward
            self._next += 1

    # ------------------------------------------------------------------ after the backward
    def finish(self, ride_along: list[torch.Tensor] | None = None) -> None:
        """Complete the step's reduction (collective: every rank, every step).

        Parameters without a gradient get zeros; buckets not started yet start now; then
        every sum is written back to ``p.grad`` (divided by the dp size if ``dp_mean``),
        ``tp_partial_grad`` gradients are summed over tensor parallelism, and ``ride_along``
        tensors (e.g. the loss sum) are summed over data parallelism in place.
        """
        zero_filled = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
                zero_filled.append(self._names[id(p)])
        for bucket in self.buckets[self._next :]:
            bucket.pending = 0
        self._launch_ready(in_backward=False)
        extra = list(ride_along or [])
        ride_work = None
        if extra and self.groups.dp_size > 1:
            # Over dp only, as finalize_grads: context-parallel ranks hold the same loss.
            flat = torch.cat([t.reshape(-1) for t in extra])
            ride_work = dist.all_reduce(flat, group=self.groups.dp, async_op=True)
        in_backward = 0
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            in_backward += bucket.launched_in_backward
            for p, off in zip(bucket.params, bucket.offsets, strict=True):
                assert p.grad is not None
                p.grad.copy_(bucket.buffer[off : off + p.numel()].view_as(p.grad))
                if self.dp_mean and self.groups.dp_size > 1:
                    p.grad.div_(self.groups.dp_size)
            bucket.reset()
        if self.groups.tp_size > 1:
            partial = [
                p.grad
                for p in self.params
                if p.grad is not None and getattr(p, "tp_partial_grad", False)
            ]
            all_reduce_coalesced(partial, self.groups.tp)
        if ride_work is not None:
            ride_work.wait()
            offset = 0
            for t in extra:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        self.stats = ReducerStats(
            buckets=len(self.buckets),
            launched_in_backward=in_backward,
            launched_in_finish=len(self.buckets) - in_backward,
            zero_filled=zero_filled,
        )
        self._ready.clear()
        self._accumulated.clear()
        self._expected = 1
        self._next = 0

    def remove(self) -> None:
        """Remove the backward hooks (the reducer does nothing afterwards)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
