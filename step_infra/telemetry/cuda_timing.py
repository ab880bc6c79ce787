"""Section timing with CUDA events, read back asynchronously.

On GPU the host returns from a kernel launch long before the kernel finishes, so host clocks
time the launch, not the work. A section therefore records a pair of timing events on the
current stream; the exporter thread later polls ``Event.query()`` (which never blocks) and,
once the end event has completed, reads ``elapsed_time``. Nothing here calls
``synchronize``: a training step is never stalled to read a timer. Pending pairs are bounded;
past the bound a section is dropped and counted, like the ring buffer.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from step_infra.telemetry.window import Kind, Record


class CudaTimer:
    """Owns pending (start, end) event pairs and turns completed ones into records."""

    def __init__(self, torch_module: Any, *, max_pending: int = 4096) -> None:
        self._torch = torch_module
        self._pending: deque[tuple[str, int, Any, Any, int]] = deque()
        self._free: list[Any] = []
        self._max_pending = max_pending
        self.dropped = 0

    def _event(self) -> Any:
        return self._free.pop() if self._free else self._torch.cuda.Event(enable_timing=True)

    def start(self) -> Any:
        event = self._event()
        event.record()
        return event

    def stop(self, name: str, step: int, start_event: Any) -> None:
        end_event = self._event()
        end_event.record()
        if len(self._pending) >= self._max_pending:
            self.dropped += 1
            self._free.extend((start_event, end_event))
            return
        self._pending.append((name, step, start_event, end_event, time.time_ns()))

    def poll(self) -> list[Record]:
        """Records of every completed pair, in order; stops at the first unfinished one."""
        out: list[Record] = []
        while self._pending:
            name, step, start_event, end_event, t_ns = self._pending[0]
            if not end_event.query():
                break
            self._pending.popleft()
            seconds = start_event.elapsed_time(end_event) / 1e3
            out.append((Kind.SECTION, name, step, seconds, t_ns))
            self._free.extend((start_event, end_event))
        return out

    def __len__(self) -> int:
        return len(self._pending)

    def oldest_pending_step(self) -> int | None:
        """The step of the oldest unfinished pair (its window must wait), or None."""
        try:
            return self._pending[0][1]
        except IndexError:
            return None
