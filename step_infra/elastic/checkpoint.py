"""Distributed checkpoints with torch.distributed.checkpoint (DCP): the one checkpoint format.

Every rank writes its own shards in parallel, asynchronously (DCP stages a copy, then writes
in a background thread on a gloo group of its own, so the save never shares a process group
with training collectives). A checkpoint is *durable* once DCP renamed its ``.metadata`` file
into place, which it does last; :func:`latest_durable` only ever returns such a directory, so a
rank killed mid-save leaves a torn directory that resume ignores.

Keys: tensor-parallel shards are plain tensors that differ per TP rank, which DCP would take
for replicas and de-duplicate, so their keys carry the TP rank (``...@tp1of2``); replicated
parameters keep their name and are written once. A checkpoint therefore reloads on any number
of data-parallel replicas with the same TP degree. AdamW's state is stored beside each
parameter (other optimizers' state the same way, once it exists), and ``meta/step`` says
which step the checkpoint ends; a streaming job derives its data position from it. A sharded
optimizer (torch's ``ZeroRedundancyOptimizer``, :mod:`step_infra.train.zero`) contributes
the state of the parameters this rank owns, under the same keys: each key is written by
its one owner, and a load asks for the keys of the parameters the loading rank owns, so a
checkpoint moves between replicated and sharded AdamW and between data-parallel sizes. Every
elastic worker (the DiT job and the controller's toy job alike) saves and resumes through
:class:`Checkpointer`, driven by :class:`~step_infra.elastic.session.ElasticSession`.
"""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

log = logging.getLogger(__name__)

METADATA = ".metadata"


def _key(name: str, p: torch.Tensor, tp_rank: int, tp_size: int) -> str:
    sharded = tp_size > 1 and bool(getattr(p, "tensor_model_parallel", False))
    return f"{name}@tp{tp_rank}of{tp_size}" if sharded else name


def init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Create Adam(W)'s state up front (zeros), so that a checkpoint can load into it (other
    optimizers: their state as it is; plain SGD has none)."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }


def _local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer holding this rank's state: ZeRO's local one (over the parameters this
    rank owns), else ``optimizer`` itself. ZeRO's own ``state`` stays empty, so reading it
    would silently checkpoint no optimizer state at all."""
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        return optimizer.optim
    return optimizer


def state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, step: int, *, tp_rank: int, tp_size: int
) -> dict[str, torch.Tensor]:
    """Flat ``name -> tensor`` view of model and optimizer (the live tensors: loading into it
    restores in place). With a sharded optimizer, only the state this rank owns."""
    local = _local_optimizer(optimizer)
    init_adam_state(local)
    out: dict[str, torch.Tensor] = {"meta/step": torch.tensor([step], dtype=torch.int64)}
    for name, p in model.named_parameters():
        key = _key(name, p, tp_rank, tp_size)
        out[f"model/{key}"] = p.data
        for slot, value in local.state.get(p, {}).items():
            out[f"optim/{slot}/{key}"] = value
    return out


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step{step:08d}"


def latest_durable(root: Path) -> Path | None:
    """The newest checkpoint directory whose metadata was written (i.e. complete)."""
    done = sorted(p for p in Path(root).glob("step*") if (p / METADATA).exists())
    return done[-1] if done else None


def durable_step(path: Path) -> int:
    return int(path.name.removeprefix("step"))


class Checkpointer:
    """Async DCP saves, one in flight at a time, and loads; the same calls on every rank."""

    def __init__(self, root: Path, *, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep
        self._group = dist.new_group(backend="gloo")  # collective: every rank creates it
        self._pending: tuple[int, Future[Any]] | None = None

    def save_async(self, state: dict[str, torch.Tensor], step: int) -> None:
        """Start saving ``state`` for ``step`` (waits for the previous save first)."""
        self.wait()
        fut = dcp.async_save(
            state, checkpoint_id=step_dir(self.root, step), process_group=self._group
        )
        if not isinstance(fut, Future):  # newer torch: a response object carrying the future
            fut = fut.upload_completion  # type: ignore[union-attr]
        self._pending = (step, fut)

    def save(self, state: dict[str, torch.Tensor], step: int) -> int:
        """Save synchronously (the final checkpoint); returns the step now durable."""
        self.wait()
        dcp.save(state, checkpoint_id=step_dir(self.root, step), process_group=self._group)
        self._prune()
        return step

    def wait(self) -> int | None:
        """Finish the save in flight; returns its step, now durable on every rank."""
        if self._pending is None:
            return None
        step, fut = self._pending
        self._pending = None
        fut.result()
        self._prune()
        return step

    def poll(self) -> int | None:
        """Like :meth:`wait` but only if the save already finished (never blocks)."""
        if self._pending is None or not self._pending[1].done():
            return None
        return self.wait()

    def load(self, state: dict[str, torch.Tensor]) -> int | None:
        """Load the newest durable checkpoint into ``state`` in place; its step, or None."""
        path = latest_durable(self.root)
        if path is None:
            return None
        dcp.load(state, checkpoint_id=path, process_group=self._group)
        return int(state["meta/step"].item())

    def _prune(self) -> None:
        if dist.get_rank() != 0:
            return
        done = sorted(p for p in self.root.glob("step*") if (p / METADATA).exists())
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def gather_full_state(model: nn.Module, tp_group: Any, tp_size: int) -> dict[str, torch.Tensor]:
    """The unsharded model weights (collective over the TP group), e.g. for sampling."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if tp_size > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(t) for _ in range(tp_size)]
            dist.all_gather(parts, t.contiguous(), group=tp_group)
            t = torch.cat(parts, dim=int(getattr(p, "partition_dim", 0)))
        out[name] = t.clone()
    return out
