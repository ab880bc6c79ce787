"""``EvictionPolicy``: what to do about a detection. Two real policies: detect-only and evict.

A policy only decides; the elastic controller acts (stops the node's agent) and writes the
events. Keeping the decision separate lets a job run detect-only first and switch to evict
once the thresholds are trusted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from step_infra.telemetry.detector import Detection


@dataclass(frozen=True, slots=True, kw_only=True)
class EvictionDecision:
    node: str
    detection: Detection
    reason: str


class EvictionPolicy(Protocol):
    """Turns detections into evictions (possibly none)."""

    name: str

    def decide(
        self, detections: Sequence[Detection], *, spares_left: int
    ) -> list[EvictionDecision]: ...


class DetectOnly:
    """Log detections, never evict."""

    name = "detect"

    def decide(
        self, detections: Sequence[Detection], *, spares_left: int
    ) -> list[EvictionDecision]:
        return []


class Evict:
    """Evict the node of each detection, at most ``max_evictions`` in a job.

    With ``require_spare`` a node is evicted only while a hot spare can take its place, so the
    job never shrinks below its size because of a slow (but working) node.
    """

    name = "evict"

    def __init__(self, *, max_evictions: int = 1, require_spare: bool = True) -> None:
        if max_evictions < 0:
            raise ValueError(f"max_evictions must be >= 0, got {max_evictions}")
        self.max_evictions = max_evictions
        self.require_spare = require_spare
        self.evicted: list[str] = []

    def decide(
        self, detections: Sequence[Detection], *, spares_left: int
    ) -> list[EvictionDecision]:
        out: list[EvictionDecision] = []
        for det in detections:
            if det.node in self.evicted or len(self.evicted) >= self.max_evictions:
                continue
            if self.require_spare and spares_left - len(out) <= 0:
                continue
            self.evicted.append(det.node)
            out.append(
                EvictionDecision(
                    node=det.node,
                    detection=det,
                    reason=f"{det.level} {det.target} {det.effect:+.1%} slower "
                    f"(robust z {det.score:.1f})",
                )
            )
        return out


def make_policy(name: str, *, max_evictions: int = 1, require_spare: bool = True) -> EvictionPolicy:
    """``"detect"`` or ``"evict"`` (the ``--eviction`` option of ``step-infra train``)."""
    if name == "detect":
        return DetectOnly()
    if name == "evict":
        return Evict(max_evictions=max_evictions, require_spare=require_spare)
    raise ValueError(f"eviction policy must be 'detect' or 'evict', got {name!r}")
