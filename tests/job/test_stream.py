"""StepStream: exact global batches from out-of-order, duplicated deliveries (one process)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from step_infra.data.stream import StepStream


@dataclass
class _Item:
    producer: str
    seq: int
    metadata: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class _FakeConsumer:
    """Hands out queued items; records acknowledgements (the real one is tested in tests/rpc)."""

    def __init__(self, ids: list[int], *, delay_after: int | None = None) -> None:
        self.queue = deque(
            _Item("p", n, {"id": i}, {"latent": torch.full((2,), float(i))})
            for n, i in enumerate(ids)
        )
        self.acked: list[int] = []
        self.delay_after = delay_after
        self.taken = 0

    def get(self, timeout_s: float | None = None) -> _Item | None:
        if self.delay_after is not None and self.taken >= self.delay_after:
            if timeout_s:  # the late items arrive once the trainer actually waited
                time.sleep(timeout_s)
                self.delay_after = None
            return None
        if not self.queue:
            return None
        self.taken += 1
        return self.queue.popleft()

    def acknowledge(self, items: list[Any]) -> None:
        self.acked += [int(i.seq) for i in items]


@pytest.fixture(scope="module", autouse=True)
def _single_rank(tmp_path_factory: pytest.TempPathFactory) -> Any:
    store = dist.FileStore(str(Path(tmp_path_factory.mktemp("pg")) / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _stream(consumer: _FakeConsumer, position: int = 0) -> StepStream:
    return StepStream(
        consumer, global_batch=4, replica=0, replica_of_rank=[0], position=position, poll_s=0.01
    )


def test_batches_are_exact_ids_whatever_the_arrival_order() -> None:
    consumer = _FakeConsumer([5, 1, 0, 7, 3, 2, 6, 4, 2, 9])  # 2 twice, 9 belongs to step 2
    stream = _stream(consumer)
    first, _ = stream.batch(0)
    second, _ = stream.batch(1)
    assert [s.id for s in first] == [0, 1, 2, 3]
    assert [s.id for s in second] == [4, 5, 6, 7]
    assert float(first[2].tensors["latent"][0]) == 2.0
    assert stream.duplicates == 1
    assert stream.buffered == 1  # sample 9 waits for its step


def test_commit_acknowledges_only_what_the_checkpoint_covers() -> None:
    consumer = _FakeConsumer([0, 1, 2, 3, 4, 5, 6, 7])
    stream = _stream(consumer)
    stream.batch(0)
    stream.batch(1)
    assert stream.commit(4) == 4
    assert sorted(consumer.acked) == [0, 1, 2, 3]  # seq == position in the queue here
    assert stream.commit(8) == 4


def test_resume_drops_and_acknowledges_samples_already_trained() -> None:
    consumer = _FakeConsumer([2, 3, 4, 5, 6, 7])  # 2 and 3 re-sprayed after a crash
    stream = _stream(consumer, position=4)
    batch, _ = stream.batch(1)
    assert [s.id for s in batch] == [4, 5, 6, 7]
    assert sorted(consumer.acked) == [0, 1]  # the deliveries of ids 2 and 3
    with pytest.raises(ValueError, match="already trained"):
        stream.batch(0)


def test_waiting_for_late_samples_counts_as_data_stall() -> None:
    consumer = _FakeConsumer([0, 1, 2, 3], delay_after=2)
    batch, timing = _stream(consumer).batch(0)
    assert [s.id for s in batch] == [0, 1, 2, 3]
    assert timing.rounds > 1 and timing.stall_s >= 0.01


def test_missing_samples_time_out_naming_them() -> None:
    stream = StepStream(
        _FakeConsumer([0, 1]), global_batch=4, replica=0, replica_of_rank=[0], position=0,
        poll_s=0.01, timeout_s=0.1,
    )  # fmt: skip
    with pytest.raises(TimeoutError, match=r"samples \[2, 3\]"):
        stream.batch(0)
