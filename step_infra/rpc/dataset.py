"""A ``torch.utils.data.IterableDataset`` over a consumer, for plain DataLoader loops.

The consumer is built lazily inside ``__iter__`` (zmq sockets cannot cross a fork), so the
dataset object itself is cheap to pickle into DataLoader workers; use ``num_workers=0`` or
one consumer member per worker. Tensors a producer sent from a CUDA device arrive on this
process's CUDA device (``ConsumerConfig.device``); a DataLoader with worker processes should
then use ``device="cpu"`` and move batches itself (CUDA does not cross a fork either).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch.utils.data import IterableDataset

from step_infra.rpc.consumer import Consumer, ConsumerConfig


class PipeDataset(IterableDataset[dict[str, Any]]):
    """Yields ``{**tensors, "metadata": metadata}`` for each item of the pipe."""

    def __init__(
        self,
        pipe: str,
        addresses: Sequence[str],
        *,
        group: str = "g0",
        member: str = "0",
        config: ConsumerConfig | None = None,
        limit: int | None = None,
        factory: Callable[..., Consumer] = Consumer,
    ) -> None:
        self.pipe = pipe
        self.addresses = list(addresses)
        self.group = group
        self.member = member
        self.config = config
        self.limit = limit
        self._factory = factory

    def __iter__(self) -> Iterator[dict[str, Any]]:
        consumer = self._factory(
            self.pipe, self.addresses, group=self.group, member=self.member, config=self.config
        )
        try:
            for n, item in enumerate(consumer):
                if self.limit is not None and n >= self.limit:
                    break
                # CPU tensors alias the consumer's receive buffers (reused after the next
                # take): cloned. Tensors it put on a CUDA device are its own copies already.
                out: dict[str, Any] = {
                    k: t.clone() if t.device.type == "cpu" else t for k, t in item.tensors.items()
                }
                out["metadata"] = item.metadata
                yield out
        finally:
            consumer.close()


__all__ = ["PipeDataset"]
