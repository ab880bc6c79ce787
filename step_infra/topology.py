"""The process grid: one object that says which rank does what, shared by planner and trainer.

Ranks are laid out like picotron's ``arange(world).view(dp, pp, cp, tp)``: tensor parallel is
the fastest-varying dimension (neighbouring ranks, same node, NVLink), then context parallel,
then pipeline, then data parallel. The emulator's ``Strategy.grid()`` is this grid: it prices
a layout with it, and the trainer builds its ``torch.distributed`` groups from the same object
(read from the run's plan, :class:`step_infra.emulator.plan.Plan`), so both agree on who talks
to whom.

Pure Python except :func:`new_torch_groups`, which imports torch lazily.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

AXES = ("dp", "pp", "cp", "tp")


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessGrid:
    """A ``dp x pp x cp x tp`` grid of ranks (tp fastest)."""

    dp: int = 1
    pp: int = 1
    cp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for axis in AXES:
            size = getattr(self, axis)
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"{axis} must be a positive integer, got {size!r}")

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.cp * self.tp

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.dp, self.pp, self.cp, self.tp)

    def coords(self, rank: int) -> dict[str, int]:
        """The ``{dp, pp, cp, tp}`` coordinates of ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside the grid of {self.world_size} ranks")
        out: dict[str, int] = {}
        rest = rank
        for axis, size in zip(reversed(AXES), reversed(self.shape), strict=True):
            out[axis] = rest % size
            rest //= size
        return {axis: out[axis] for axis in AXES}

    def rank_of(self, **coords: int) -> int:
        """Inverse of :meth:`coords`; missing axes default to 0."""
        rank = 0
        for axis, size in zip(AXES, self.shape, strict=True):
            c = coords.get(axis, 0)
            if not 0 <= c < size:
                raise ValueError(f"{axis}={c} outside 0..{size - 1}")
            rank = rank * size + c
        return rank

    def groups(self, axis: str) -> list[list[int]]:
        """All rank lists that vary only along ``axis`` (one list per group), in order."""
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        others = [a for a in AXES if a != axis]
        ranges = [range(getattr(self, a)) for a in others]
        result = []
        for fixed in itertools.product(*ranges):
            base = dict(zip(others, fixed, strict=True))
            result.append([self.rank_of(**base, **{axis: i}) for i in range(getattr(self, axis))])
        return result

    def group_of(self, axis: str, rank: int) -> list[int]:
        """The ranks in ``rank``'s group along ``axis``."""
        for g in self.groups(axis):
            if rank in g:
                return g
        raise AssertionError("every rank is in exactly one group per axis")

    @classmethod
    def for_world(cls, world_size: int, *, tp: int = 1, pp: int = 1, cp: int = 1) -> ProcessGrid:
        """A grid whose data-parallel size fills the rest of ``world_size``."""
        model = tp * pp * cp
        if world_size % model:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = {model}; "
                "pick sizes whose product divides the number of ranks"
            )
        return cls(dp=world_size // model, pp=pp, cp=cp, tp=tp)


def new_torch_groups(grid: ProcessGrid, backend: str | None = None) -> dict[str, ProcessGroup]:
    """Create every group of every axis (collectively, on all ranks) and keep this rank's.

    ``torch.distributed.new_group`` must be called by all ranks for every group in the same
    order, which is why all groups are created even though each rank keeps four.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialized; call init_process_group first")
    world = dist.get_world_size()
    if world != grid.world_size:
        raise ValueError(f"grid {grid.shape} needs {grid.world_size} ranks, world has {world}")
    rank = dist.get_rank()
    mine: dict[str, Any] = {}
    for axis in AXES:
        for ranks in grid.groups(axis):
            group = dist.new_group(ranks, backend=backend)
            if rank in ranks:
                mine[axis] = group
    return mine
