"""Trainer side of the pipes: exact, timing-independent global batches out of a spray.

Spray hands each sample to whichever data-parallel replica has credit, so *which replica*
receives a sample depends on timing. What a step trains must not: step ``s`` trains exactly
samples ``[s * global_batch, (s + 1) * global_batch)`` of the stream, whoever received them.
Then the loss curve does not depend on arrival timing, and a job resumed from the checkpoint of
step ``s`` continues at sample ``(s + 1) * global_batch``: none twice, none skipped.

Per step, every rank of the job runs the same loop (so the collectives match):

1. drain the consumer into a reorder buffer keyed by sample id; ids the checkpoint already
   covers are acknowledged and dropped, and so are duplicates (at-least-once on the wire);
2. all-gather which of the step's ids each rank holds; a replica *holds* an id when every one
   of its ranks does (members of a group get the same items, not at the same instant);
3. if every id is held by some replica, each goes to the lowest replica holding it and the
   step starts; otherwise wait briefly for more items and go back to 1.

The time spent in step 3's "otherwise" branch is the *data stall*: the trainer had nothing to
train on. Time spent in the first all-gather is waiting for other ranks (a straggler), not
for data, and is reported apart.

Acknowledgements are manual: :meth:`StepStream.commit` acknowledges items once a durable
checkpoint covers them, so a crash re-delivers (re-sprays) exactly what the checkpoint does
not cover.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Sample:
    """One sample taken from the pipe; tensors are private copies (shm buffers are reused)."""

    id: int
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    acks: list[WireRef] = field(default_factory=list)  # wire deliveries to acknowledge


class WireRef(NamedTuple):
    """What acknowledging a delivery needs (not the item: its buffers may be reused)."""

    producer: str
    seq: int


@dataclass(slots=True)
class StepTiming:
    """Where one step's wait for its batch went."""

    stall_s: float = 0.0  # waiting because the step's samples had not arrived
    sync_s: float = 0.0  # waiting in the first all-gather (for other ranks)
    rounds: int = 0


class StepStream:
    """Global batches of one job, built from ``consumer`` (a manual-ack :class:`Consumer`).

    ``replica_of_rank[r]`` is the data-parallel replica of global rank ``r``; ``position`` is
    the first sample id not yet trained (from the checkpoint, 0 on a fresh start).
    """

    def __init__(
        self,
        consumer: Any,
        *,
        global_batch: int,
        replica: int,
        replica_of_rank: list[int],
        position: int,
        poll_s: float = 0.01,
        timeout_s: float = 300.0,
        group: Any = None,
    ) -> None:
        if global_batch < 1:
            raise ValueError(f"global_batch {global_batch}; expected >= 1")
        self.consumer = consumer
        self.global_batch = global_batch
        self.replica = replica
        self.replica_of_rank = replica_of_rank
        self.replicas = max(replica_of_rank) + 1
        self.position = position
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.group = group
        self._buffer: dict[int, Sample] = {}
        self._done: list[Sample] = []  # trained (or dropped), waiting for a durable checkpoint
        self.duplicates = 0

    # ------------------------------------------------------------------ public
    def batch(self, step: int) -> tuple[list[Sample], StepTiming]:
        """This replica's samples of ``step`` (sorted by id) and how long it waited."""
        first = step * self.global_batch
        if first < self.position:
            raise ValueError(
                f"step {step} starts at sample {first}, before the stream position "
                f"{self.position}: those samples were already trained"
            )
        ids = range(first, first + self.global_batch)
        timing = StepTiming()
        started = time.monotonic()
        report_at = 10.0
        while True:
            self._drain()
            t0 = time.monotonic()
            holders = self._holders(ids)
            if timing.rounds == 0:
                timing.sync_s = time.monotonic() - t0
            timing.rounds += 1
            if all(h for h in holders):
                break
            waited = time.monotonic() - started
            if waited > report_at:  # say what is missing while waiting, every 10 s
                report_at += 10.0
                missing = [i for i, h in zip(ids, holders, strict=True) if not h]
                held = sorted(self._buffer)
                log.warning(
                    "step %d: waiting %.0f s for samples %s; holding %d (%s..%s); consumer %s",
                    step, waited, missing[:8], len(held), held[:1], held[-1:],
                    getattr(self.consumer, "stats", None),
                )  # fmt: skip
            if time.monotonic() - started > self.timeout_s:
                missing = [i for i, h in zip(ids, holders, strict=True) if not h]
                raise TimeoutError(
                    f"step {step}: samples {missing[:8]}{'...' if len(missing) > 8 else ''} "
                    f"not received within {self.timeout_s} s (encoder servers down or too "
                    "slow? see servers/*.json in the run directory)"
                )
            self._take(self.poll_s)
        if timing.rounds > 1:  # everything after the first gather was spent waiting for data
            timing.stall_s = time.monotonic() - started - timing.sync_s
        mine = []
        for i, h in zip(ids, holders, strict=True):
            sample = self._buffer.pop(i, None)
            if min(h) == self.replica:
                assert sample is not None, f"sample {i} assigned here but not held"
                mine.append(sample)
            elif sample is not None:  # another replica trains it: ours is a duplicate
                self._done.append(sample)
        self._done.extend(mine)
        self.position = first + self.global_batch
        return mine, timing

    def commit(self, position: int) -> int:
        """Acknowledge every taken sample below ``position`` (a durable checkpoint covers
        them); returns how many were acknowledged."""
        ready = [s for s in self._done if s.id < position]
        self._done = [s for s in self._done if s.id >= position]
        self.consumer.acknowledge([a for s in ready for a in s.acks])
        return len(ready)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    # ----------------------------------------------------------------- private
    def _take(self, timeout_s: float) -> None:
        item = self.consumer.get(timeout_s=timeout_s)
        if item is not None:
            self._keep(item)

    def _drain(self) -> None:
        while True:
            item = self.consumer.get(timeout_s=0)
            if item is None:
                return
            self._keep(item)

    def _keep(self, item: Any) -> None:
        sid = int(item.metadata["id"])
        if sid < self.position:  # trained before the restart: only acknowledge it
            self.consumer.acknowledge([WireRef(item.producer, item.seq)])
            return
        held = self._buffer.get(sid)
        if held is not None:
            self.duplicates += 1
            held.acks.append(WireRef(item.producer, item.seq))
            return
        tensors = {k: t.clone() for k, t in item.tensors.items()}
        self._buffer[sid] = Sample(
            sid, tensors, dict(item.metadata), [WireRef(item.producer, item.seq)]
        )

    def _holders(self, ids: range) -> list[list[int]]:
        """For each id, the replicas all of whose ranks hold it (same answer on every rank)."""
        mask = torch.tensor([i in self._buffer for i in ids], dtype=torch.uint8)
        world = dist.get_world_size(self.group)
        gathered = [torch.empty_like(mask) for _ in range(world)]
        dist.all_gather(gathered, mask, group=self.group)
        held = torch.ones(self.replicas, len(ids), dtype=torch.uint8)
        for rank, m in enumerate(gathered):
            held[self.replica_of_rank[rank]] &= m
        return [[r for r in range(self.replicas) if held[r, j]] for j in range(len(ids))]
