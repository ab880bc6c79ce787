"""Plain counters per pipe endpoint, readable by telemetry without rpc importing telemetry.

Counters only ever grow (except ``queue_depth``, a gauge); a reader computes rates from two
snapshots. Updating them is a few integer additions on the hot path.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


@dataclass(slots=True, kw_only=True)
class PipeStats:
    """Counters of one producer or consumer."""

    pipe: str
    items: int = 0
    bytes: int = 0
    duplicates: int = 0
    malformed: int = 0
    resent: int = 0
    queue_depth: int = 0
    wait_s: float = 0.0
    started: float = field(default_factory=time.monotonic)

    def snapshot(self) -> dict[str, float | int | str]:
        """A copy of the counters plus derived rates since start."""
        out: dict[str, float | int | str] = dict(asdict(self))
        elapsed = max(time.monotonic() - self.started, 1e-9)
        out["items_per_s"] = self.items / elapsed
        out["bytes_per_s"] = self.bytes / elapsed
        return out
