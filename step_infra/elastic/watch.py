"""``StragglerWatch``: the controller's straggler loop, from store rows to eviction decisions.

Each poll: new store rows -> :class:`~step_infra.elastic.feed.StepFeed` (one value per rank
per complete step) -> :class:`~step_infra.telemetry.detector.StragglerDetector` -> the
:class:`~step_infra.elastic.policy.EvictionPolicy`, priced with what the job shows (median
step time, the measured restart cost, the steps since the last durable checkpoint, the steps
left). A detection the policy does not act on yet (not worth it, no spare) stays *pending*
and is priced again as the job goes on, until it is evicted or the straggler recovers; each
change of verdict is one event in ``events.jsonl`` (``detection``, ``would_evict``,
``eviction_deferred``, ``straggler_recovered``), so an SRE reads why the controller did what
it did. Kept apart from the controller so it can be tested, and timed, without processes.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from step_infra.elastic.feed import StepFeed
from step_infra.elastic.policy import EvictionDecision, EvictionPolicy, JobProgress
from step_infra.telemetry.detector import Detection, DetectorConfig, StragglerDetector
from step_infra.telemetry.events import EventLog

if TYPE_CHECKING:
    from step_infra.telemetry.otel import StragglerScores


@dataclass(slots=True, kw_only=True)
class WatchState:
    """What the controller tells the watch on every poll."""

    generation: int
    active_nodes: list[str]
    last_durable_step: int = -1
    spares_left: int = 0


@dataclass(slots=True)
class _Pending:
    detection: Detection
    action: str = ""


@dataclass(slots=True, kw_only=True)
class WatchStats:
    steps: int = 0
    cpu_s: float = 0.0
    detections: list[Detection] = field(default_factory=list)


class StragglerWatch:
    """Feed, detector and policy of one job (see the module doc)."""

    def __init__(
        self,
        config: DetectorConfig,
        policy: EvictionPolicy,
        events: EventLog | None,
        *,
        section: str = "compute",
        signal: str = "compute",
        steps_total: int | None = None,
        restart_s: float = 30.0,
        scores: StragglerScores | None = None,
    ) -> None:
        self.detector = StragglerDetector(config)
        self.feed = StepFeed(section=section, signal=signal)
        self.policy = policy
        self.events = events
        self.steps_total = steps_total
        self.restart_s = restart_s  # the controller replaces it with what it measures
        self.pending: dict[str, _Pending] = {}
        self.scores = scores  # the straggler-score gauge (Prometheus / OTLP), when exported
        self._windows_exported = 0
        self._step_times: deque[float] = deque(maxlen=64)
        self._last_step = -1
        self.stats = WatchStats()

    def restart(self, generation: int) -> None:
        """A new generation: its membership and timings start over."""
        self.detector.reset()
        self.feed.drop_attempts_before(generation)
        self.pending.clear()
        self._windows_exported = 0
        if self.scores is not None:  # the old membership's series end here
            self.scores.update({}, {})

    def poll(self, rows: pd.DataFrame, state: WatchState) -> list[EvictionDecision]:
        """Take new rows; return the decisions to act on (``action == "evict"``)."""
        t0 = time.process_time()
        self._note_step_times(rows, state.generation)
        self.feed.add(rows)
        act: list[EvictionDecision] = []
        for fs in self.feed.complete(state.active_nodes):
            if fs.attempt != state.generation:
                continue
            self.stats.steps += 1
            self._last_step = max(self._last_step, fs.step)
            ranks = tuple(fs.ranks.tolist())
            found = self.detector.observe_array(fs.step, ranks, fs.values, fs.nodes)
            for det in found:
                self._emit_detection(det, fs.step, fs.attempt)
                self.pending[det.node] = _Pending(det)
                self.stats.detections.append(det)
            if self.pending:
                act += self._decide(state)
        self._export_scores()
        self.stats.cpu_s += time.process_time() - t0
        return act

    def progress(self, state: WatchState) -> JobProgress:
        step_s = float(np.median(self._step_times)) if self._step_times else 0.0
        return JobProgress(
            step=self._last_step,
            steps_total=self.steps_total,
            step_s=step_s,
            restart_s=self.restart_s,
            last_durable_step=state.last_durable_step,
        )

    # ------------------------------------------------------------------ internals
    def _export_scores(self) -> None:
        """Hand the latest window's per-rank scores to the gauge, once per new window."""
        windows = self.detector.windows_scored
        if self.scores is None or windows == self._windows_exported:
            return
        self._windows_exported = windows
        self.scores.update(self.detector.latest_scores(), self.detector.member_nodes())

    def _note_step_times(self, rows: pd.DataFrame, generation: int) -> None:
        if rows.empty:
            return
        steps = rows[(rows["kind"] == "step") & (rows["attempt"] == generation)]
        if not steps.empty:  # the job's step time is its slowest rank's: max per step
            self._step_times.extend(steps.groupby("step")["value"].max().to_numpy().tolist())

    def _decide(self, state: WatchState) -> list[EvictionDecision]:
        for node, p in list(self.pending.items()):
            det = p.detection
            if not self.detector.still_slow(det.target, level=det.level):
                self._emit(
                    "straggler_recovered", node=node, target=det.target, step=self._last_step
                )
                del self.pending[node]
        if not self.pending:
            return []
        progress = self.progress(state)
        decisions = self.policy.decide(
            [p.detection for p in self.pending.values()],
            progress=progress,
            spares_left=state.spares_left,
        )
        act = []
        for d in decisions:
            waiting = self.pending.get(d.node)
            if waiting is None:
                continue
            if d.evict:
                act.append(d)
                del self.pending[d.node]
                continue
            if d.action != waiting.action:  # one event per change of verdict, not per step
                waiting.action = d.action
                kind = "would_evict" if d.action == "would_evict" else "eviction_deferred"
                self._emit(
                    kind,
                    node=d.node,
                    level=d.detection.level,
                    target=d.detection.target,
                    step=d.step,
                    action=d.action,
                    saving_s=d.saving_s,
                    cost_s=d.cost_s,
                    reason=d.reason,
                )
        return act

    def _emit_detection(self, det: Detection, step: int, generation: int) -> None:
        self._emit(
            "detection",
            level=det.level,
            target=det.target,
            node=det.node,
            step=step,
            generation=generation,
            score=round(det.score, 2),
            effect=round(det.effect, 4),
            extra_s=round(det.extra_s, 4),
            evidence=det.evidence,
        )

    def _emit(self, kind: str, **fields: object) -> None:
        if self.events is not None:
            self.events.emit(kind, **fields)
