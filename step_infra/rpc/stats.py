"""Plain counters per pipe endpoint, readable by telemetry without rpc importing telemetry.

Counters only ever grow (except ``queue_depth``, a gauge); a reader computes rates from two
snapshots. Updating them is a few integer additions on the hot path.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field, fields

log = logging.getLogger(__name__)

MAX_EVENTS = 256


@dataclass(slots=True, kw_only=True)
class PipeStats:
    """Counters of one producer or consumer."""

    pipe: str
    items: int = 0
    bytes: int = 0
    duplicates: int = 0
    malformed: int = 0  # messages refused: schema, sizes, frame counts (see guard.py)
    unauthenticated: int = 0  # messages or hellos of peers that did not prove the job token
    refused: int = 0  # messages ignored: from banned peers, or from peers that are no member
    dropped_peers: int = 0  # peers dropped after repeated offences
    resent: int = 0
    queue_depth: int = 0
    wait_s: float = 0.0
    started: float = field(default_factory=time.monotonic)
    # what went wrong on the links, newest last: {"t", "kind", "peer", "reason"}
    events: deque[dict[str, object]] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))

    def event(self, kind: str, peer: object, reason: str) -> None:
        """Record (and log) a link event such as ``lane_failed`` or ``peer_dropped``."""
        self.events.append({"t": time.time(), "kind": kind, "peer": repr(peer), "reason": reason})
        log.warning("pipe %s: %s %r: %s", self.pipe, kind, peer, reason)

    def snapshot(self) -> dict[str, float | int | str]:
        """A copy of the counters plus derived rates since start (events excluded)."""
        out: dict[str, float | int | str] = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name != "events"
        }
        elapsed = max(time.monotonic() - self.started, 1e-9)
        out["items_per_s"] = self.items / elapsed
        out["bytes_per_s"] = self.bytes / elapsed
        return out
