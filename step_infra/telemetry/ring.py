"""A bounded, non-blocking record buffer between the training thread and the exporter thread.

Telemetry must never stall a training step (STYLE.md, principle 7): the hot path appends to a
fixed-capacity buffer and, when it is full, drops the new record and counts the drop instead
of waiting. ``collections.deque`` already gives lock-free, GIL-atomic ``append`` and
``popleft`` for one producer and one consumer, so this wraps it rather than hand-rolling a
ring of indices; the only addition is the capacity check and the drop counter.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class RingBuffer(Generic[T]):
    """Single-producer / single-consumer bounded buffer that drops (and counts) when full."""

    __slots__ = ("_capacity", "_items", "appended", "dropped")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._items: deque[T] = deque()
        self.appended = 0
        self.dropped = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._items)

    def append(self, item: T) -> bool:
        """Append ``item``; return False (and count a drop) if the buffer is full. Never blocks."""
        if len(self._items) >= self._capacity:
            self.dropped += 1
            return False
        self._items.append(item)
        self.appended += 1
        return True

    def drain(self, max_items: int | None = None) -> list[T]:
        """Remove and return up to ``max_items`` oldest items (all if None)."""
        out: list[T] = []
        items = self._items
        limit = len(items) if max_items is None else min(max_items, len(items))
        for _ in range(limit):
            try:
                out.append(items.popleft())
            except IndexError:  # pragma: no cover - only one consumer drains
                break
        return out
