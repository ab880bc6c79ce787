"""Host staging of CUDA tensors for the producer: reused pinned buffers, one sync per item.

Why: the wire carries host bytes, so a CUDA tensor must come to host memory before zmq, the
tcp lanes or a shared-memory segment can read it. ``tensor.cpu()`` allocates fresh pageable
memory for every item, and a device-to-host copy into pageable memory runs at a fraction of
the speed of one into pinned (page-locked) memory. :class:`StagingPool` keeps a few pinned
buffers, keyed by size, and :meth:`StagingPool.stage` copies all of an item's CUDA tensors
into one of them (``non_blocking=True``, laid out 64-byte aligned as the flat payloads are),
then synchronizes each source device's current stream once, before any transport sees the
bytes. A pool on a machine without CUDA allocates plain (pageable) buffers; it is only used
there by tests, since such a machine has no CUDA tensors to stage.

When a buffer may be reused: the pool hands out views into a buffer's numpy array, and the
producer's item keeps them as its frames until every receiver acknowledged it. Whatever else
reads the bytes later keeps a reference as well: a zmq ``copy=False`` frame holds its buffer
until libzmq released the message (pyzmq drops the reference then), a lane thread holds its
stripe's views until ``sendall`` returned, and the shared-memory copy is made synchronously
(after it the item's frames point into the segment, not here). So a buffer is free exactly
when the pool holds the only reference to its array (the rule ``lanes.BufferPool`` uses for
receive buffers); nothing is released by hand, so nothing can be released early.

Memory: a buffer in use is its item's bytes, which the producer already counts in
``held_bytes`` until the item is acknowledged; :attr:`StagingPool.idle_bytes` (buffers kept
for reuse) is counted beside it, as idle shared-memory segments are, and :meth:`trim` lets
them go when ``send`` needs room.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import numpy as np
import torch

from step_infra.rpc.wire import supported_dtypes

ALIGN = 64  # as wire.flat_layout: every dtype view of a staged tensor is aligned


class StagingPool:
    """Reused host buffers for CUDA tensors' bytes (pinned when CUDA is available).

    ``keep``: buffers kept for reuse; when all are in use a new one is made and kept only if
    the pool has room (else it is freed with its item). ``allocations`` counts buffers made."""

    def __init__(self, keep: int = 8, *, pin: bool | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep {keep}; expected >= 1")
        self._keep = keep
        self._pin = pin  # None: decided at the first allocation (no CUDA query at import/init)
        self._bufs: list[tuple[np.ndarray, torch.Tensor]] = []  # (array handed out, its tensor)
        self.allocations = 0

    @property
    def pinned(self) -> bool:
        """Whether buffers are page-locked (CUDA is available)."""
        if self._pin is None:
            self._pin = torch.cuda.is_available()
        return self._pin

    @property
    def idle_bytes(self) -> int:
        """Bytes of the buffers kept for reuse that no item holds now."""
        return sum(arr.nbytes for arr, _ in self._bufs if sys.getrefcount(arr) <= 3)

    def trim(self) -> int:
        """Forget every idle buffer (freed at once); returns their bytes. Buffers still in use
        stay (and are freed with their items if they are not reused)."""
        idle = [i for i, (arr, _) in enumerate(self._bufs) if sys.getrefcount(arr) <= 3]
        freed = sum(self._bufs[i][0].nbytes for i in idle)
        for i in reversed(idle):
            del self._bufs[i]
        return freed

    def take(self, nbytes: int) -> tuple[np.ndarray, torch.Tensor]:
        """A buffer of at least ``nbytes`` bytes that nobody else holds: its numpy array (hand
        out views of this one: they keep it in use) and the tensor over the same memory."""
        for entry in self._bufs:
            arr = entry[0]
            # references: the entry tuple, the loop variable ``arr`` and getrefcount's argument
            if nbytes <= arr.nbytes <= 2 * nbytes + (1 << 20) and sys.getrefcount(arr) <= 3:
                return entry
        buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pinned)
        entry = (buf.numpy(), buf)
        self.allocations += 1
        if len(self._bufs) < self._keep:
            self._bufs.append(entry)
        else:  # replace an idle one, if any, so the pool follows the item sizes
            for i, (old, _) in enumerate(self._bufs):
                if sys.getrefcount(old) <= 3:
                    self._bufs[i] = entry
                    break
        return entry

    def stage(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, memoryview]:
        """Copy the CUDA tensors among ``tensors`` into one host buffer and wait for the
        copies; returns each one's bytes (views that hold the buffer while they live). Other
        tensors are not touched (an empty dict when there are no CUDA tensors), nor are those
        of a dtype the wire does not carry (``encode_item`` refuses them)."""
        wire = supported_dtypes()
        cuda = [
            (str(name), t)
            for name, t in tensors.items()
            if isinstance(t, torch.Tensor) and t.is_cuda and t.numel() > 0 and t.dtype in wire
        ]
        if not cuda:
            return {}
        sizes = [t.numel() * t.element_size() for _, t in cuda]
        offsets: list[int] = []
        total = 0
        for n in sizes:
            offsets.append(total)
            total += -(-n // ALIGN) * ALIGN
        arr, buf = self.take(total)
        devices: set[torch.device] = set()
        for (_, t), off, n in zip(cuda, offsets, sizes, strict=True):
            dst = buf[off : off + n].view(t.dtype).view(t.shape)
            dst.copy_(t.detach(), non_blocking=True)  # on t's device's current stream
            devices.add(t.device)
        for dev in devices:
            torch.cuda.current_stream(dev).synchronize()  # once per item and device
        whole = memoryview(arr)  # type: ignore[arg-type]
        return {
            name: whole[off : off + n]
            for (name, _), off, n in zip(cuda, offsets, sizes, strict=True)
        }


__all__ = ["StagingPool"]
