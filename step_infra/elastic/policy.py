"""``EvictionPolicy``: what to do about a detection, decided by what it costs the job.

A straggler costs the synchronous job ``extra_s`` every step (everyone waits for it); an
eviction costs a restart (agents re-rendezvous, workers reload the checkpoint) plus the steps
since the last durable checkpoint, which are trained again. So an eviction pays only when

    saving_s = extra_s x steps_left  >  cost_s = restart_s + rerun_steps x step_s

and a policy that evicts without asking would, near the end of a job or for a small
slowdown, make the job slower than the straggler did. Both policies price every detection
the same way (:func:`price`); they differ in what they do with the verdict:

* :class:`Evict` evicts when the saving exceeds the cost (and a spare can take the place),
  and otherwise answers ``not_worth`` so the controller keeps watching and asks again
  (a checkpoint later, the re-run part of the cost is smaller);
* :class:`DetectOnly` never evicts: it answers ``would_evict`` with the step and the saving
  ("would have evicted at step N, saving X s"), so SREs can judge the detector before they
  let it act.

A policy only decides; the elastic controller acts (stops the node's agent) and writes the
events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from step_infra.telemetry.detector import Detection

ACTIONS = ("evict", "would_evict", "not_worth", "no_spare", "limit")


@dataclass(frozen=True, slots=True, kw_only=True)
class JobProgress:
    """What the controller knows of the job when it asks a policy."""

    step: int  # the latest step the job reached
    steps_total: int | None  # None: unknown (then the saving is taken over ``horizon_steps``)
    step_s: float  # median wall time of a recent step
    restart_s: float  # measured (or estimated) time from an eviction to the resumed step
    last_durable_step: int = -1  # the latest checkpoint a restart resumes from
    horizon_steps: int = 1000  # steps assumed left when the job's length is unknown

    @property
    def steps_left(self) -> int:
        if self.steps_total is None:
            return self.horizon_steps
        return max(0, self.steps_total - 1 - self.step)

    @property
    def rerun_steps(self) -> int:
        return max(0, self.step - self.last_durable_step)


@dataclass(frozen=True, slots=True, kw_only=True)
class EvictionDecision:
    node: str
    detection: Detection
    action: str  # one of ACTIONS
    reason: str
    saving_s: float
    cost_s: float
    step: int

    @property
    def evict(self) -> bool:
        return self.action == "evict"


def price(detection: Detection, progress: JobProgress) -> tuple[float, float]:
    """``(saving_s, cost_s)`` of evicting ``detection``'s node now (module doc)."""
    saving = max(0.0, detection.extra_s) * progress.steps_left
    cost = progress.restart_s + progress.rerun_steps * progress.step_s
    return saving, cost


def _decision(
    det: Detection, progress: JobProgress, action: str, saving: float, cost: float
) -> EvictionDecision:
    what = f"{det.level} {det.target} {det.effect:+.1%} slower (robust z {det.score:.1f})"
    verdict = {
        "evict": f"evicted at step {progress.step}",
        "would_evict": f"would have evicted at step {progress.step}",
        "not_worth": "not evicted: the restart costs more than it saves",
        "no_spare": "not evicted: no spare to take its place",
        "limit": "not evicted: the job's eviction limit is reached",
    }[action]
    return EvictionDecision(
        node=det.node,
        detection=det,
        action=action,
        reason=(
            f"{what}: {verdict}; saving {saving:.1f} s over {progress.steps_left} steps left "
            f"vs cost {cost:.1f} s (restart {progress.restart_s:.1f} s + "
            f"{progress.rerun_steps} steps re-run)"
        ),
        saving_s=round(saving, 3),
        cost_s=round(cost, 3),
        step=progress.step,
    )


class EvictionPolicy(Protocol):
    """Turns detections into decisions (evict, or why not)."""

    name: str

    def decide(
        self, detections: Sequence[Detection], *, progress: JobProgress, spares_left: int
    ) -> list[EvictionDecision]: ...


class DetectOnly:
    """Never evict; say when an eviction would have paid (``would_evict``) and what it saved."""

    name = "detect"

    def __init__(self, *, margin: float = 1.0) -> None:
        self.margin = margin

    def decide(
        self, detections: Sequence[Detection], *, progress: JobProgress, spares_left: int
    ) -> list[EvictionDecision]:
        out = []
        for det in detections:
            saving, cost = price(det, progress)
            action = "would_evict" if saving > self.margin * cost else "not_worth"
            out.append(_decision(det, progress, action, saving, cost))
        return out


class Evict:
    """Evict the node of a detection when it pays, at most ``max_evictions`` in a job.

    With ``require_spare`` a node is evicted only while a hot spare can take its place, so the
    job never shrinks below its size because of a slow (but working) node. ``margin`` asks for
    a saving that many times the cost (1.0: break even; 0: evict on every detection, for tests
    of the eviction machinery on jobs too short for any eviction to pay).
    """

    name = "evict"

    def __init__(
        self, *, max_evictions: int = 1, require_spare: bool = True, margin: float = 1.0
    ) -> None:
        if max_evictions < 0:
            raise ValueError(f"max_evictions must be >= 0, got {max_evictions}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0 (0: evict on any detection), got {margin}")
        self.max_evictions = max_evictions
        self.require_spare = require_spare
        self.margin = margin
        self.evicted: list[str] = []

    def decide(
        self, detections: Sequence[Detection], *, progress: JobProgress, spares_left: int
    ) -> list[EvictionDecision]:
        out: list[EvictionDecision] = []
        for det in detections:
            if det.node in self.evicted:
                continue
            saving, cost = price(det, progress)
            evictions = sum(d.evict for d in out)
            if saving <= self.margin * cost:
                action = "not_worth"
            elif len(self.evicted) >= self.max_evictions:
                action = "limit"
            elif self.require_spare and spares_left - evictions <= 0:
                action = "no_spare"
            else:
                action = "evict"
                self.evicted.append(det.node)
            out.append(_decision(det, progress, action, saving, cost))
        return out


def make_policy(
    name: str, *, max_evictions: int = 1, require_spare: bool = True, margin: float = 1.0
) -> EvictionPolicy:
    """``"detect"`` or ``"evict"`` (the ``--eviction`` option of ``step-infra train``)."""
    if name == "detect":
        return DetectOnly(margin=margin)
    if name == "evict":
        return Evict(max_evictions=max_evictions, require_spare=require_spare, margin=margin)
    raise ValueError(f"eviction policy must be 'detect' or 'evict', got {name!r}")
