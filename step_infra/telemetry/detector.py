"""``StragglerDetector``: which rank (or node) is persistently slower than its peers.

Input: one value per member (rank or node) per aggregated window, normally the p50 of that
rank's *compute-only* time (arrival-order data says the same thing from the other side).
Why this shape:

* robust peer score: each member's value is compared with the median of all members and
  scaled by the median absolute deviation (MAD x 1.4826, a consistent estimate of sigma under
  normal noise), so one slow rank cannot inflate the spread it is judged against the way a
  mean / standard deviation would;
* warm-up windows are skipped (compilation, allocator growth, data-pipe fill);
* each member's value is smoothed over ``smooth_windows`` windows before scoring, which
  divides the jitter by about sqrt(smooth_windows);
* persistence: a member must be flagged in ``persist_k`` of its last ``persist_n`` scored
  windows, so one noisy window never evicts anyone;
* minimum effect size: a statistically clear but tiny slowdown (1 %) is not worth a restart;
* node attribution: when (nearly) all ranks of one host are flagged, the detection names the
  node, because the cause (thermal, NIC, host CPU) and the unit of eviction are the node;
* two members (e.g. a 2-node job compared node by node): a peer median of two cannot say which
  one is slow, so each member's time relative to the other's is compared with what that ratio
  was over its first ``baseline_windows`` windows after warm-up; the member whose ratio grew
  by the thresholds is blamed (``pair_max_sigma`` caps the spread that a few noisy baseline
  windows can claim). Load shared by both (a data stall, a busy host) cancels out and
  blames nobody.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution is 0.6745 sigma


@dataclass(frozen=True, slots=True, kw_only=True)
class DetectorConfig:
    """Thresholds of the straggler detector (defaults: see benchmarks/telemetry_detection.py)."""

    warmup_windows: int = 20
    smooth_windows: int = 6
    threshold: float = 5.0  # robust z-score a member must exceed
    min_effect: float = 0.05  # and be at least this much slower than the peer median
    persist_k: int = 2
    persist_n: int = 3
    node_fraction: float = 0.75  # fraction of a node's ranks slow to blame the node
    mad_floor: float = 0.005  # spread (of log values) never taken below this
    min_members: int = 3
    baseline_windows: int = 5  # two-member mode: windows that fix each member's own baseline
    # Two members have no majority to tell jitter from a straggler: ask for a larger effect
    # (a +9 % blip on a shared 2-core host was seen; a slow node worth evicting is >= 15 %).
    pair_min_effect: float = 0.15
    # Two members, noisy host: the baseline's spread, taken from a handful of windows, can be
    # large enough (0.13 seen) that no slowdown reaches the z threshold. A cap makes a sustained
    # slowdown of ``threshold x pair_max_sigma`` beyond the baseline ratio enough on its own.
    pair_max_sigma: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.persist_k <= self.persist_n:
            raise ValueError(
                f"need 1 <= persist_k <= persist_n, got persist_k={self.persist_k}, "
                f"persist_n={self.persist_n}"
            )
        for name in ("smooth_windows", "min_members"):
            if getattr(self, name) < 1:
                raise ValueError(f"DetectorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.pair_max_sigma is not None and self.pair_max_sigma <= 0:
            raise ValueError(f"pair_max_sigma must be > 0 or None, got {self.pair_max_sigma}")
        if self.warmup_windows < 0 or self.threshold <= 0 or self.min_effect < 0:
            raise ValueError(
                "warmup_windows must be >= 0, threshold > 0 and min_effect >= 0; got "
                f"{self.warmup_windows}, {self.threshold}, {self.min_effect}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class Detection:
    """A persistent straggler, with the evidence that convicted it."""

    level: str  # "rank" or "node"
    target: str  # the node name for level == "node", else the member id as a string
    node: str  # the node hosting it (what an eviction stops)
    members: tuple[str, ...]
    window: int  # index of the window (or step) at which persistence was reached
    score: float  # robust z of the latest window (max over members for a node)
    effect: float  # relative slowdown vs the peer median, latest window
    evidence: dict[str, Any] = field(default_factory=dict)


class StragglerDetector:
    """Feed :meth:`observe` one mapping ``member -> value`` per window."""

    def __init__(
        self, config: DetectorConfig | None = None, *, nodes: Mapping[Any, str] | None = None
    ) -> None:
        self.config = config or DetectorConfig()
        self._nodes = dict(nodes or {})
        self.reset()

    def reset(self) -> None:
        """Forget history (after a restart the membership and its timings change)."""
        self._seen = 0
        self._values: dict[Hashable, deque[float]] = {}
        self._flags: dict[Hashable, deque[bool]] = {}
        self._trace: dict[Hashable, deque[dict[str, float]]] = {}
        self._reported: set[str] = set()
        self._sigmas: deque[float] = deque(maxlen=4 * self.config.persist_n)
        self._baseline: dict[Hashable, list[float]] = {}

    def set_node(self, member: Hashable, node: str) -> None:
        self._nodes[member] = node

    def observe(self, window: int, values: Mapping[Any, float]) -> list[Detection]:
        """Score one window; return detections that became persistent in this window."""
        cfg = self.config
        self._seen += 1
        pair = 2 <= len(values) < cfg.min_members
        if self._seen <= cfg.warmup_windows or (len(values) < cfg.min_members and not pair):
            return []
        members = list(values)
        for m in members:
            self._values.setdefault(m, deque(maxlen=cfg.smooth_windows)).append(float(values[m]))
        ready = [m for m in members if len(self._values[m]) == cfg.smooth_windows]
        if len(ready) < (2 if pair else cfg.min_members):
            return []
        # Log space: multiplicative jitter becomes additive and symmetric.
        smoothed = np.array([np.mean(self._values[m]) for m in ready])
        logs = np.log(np.maximum(smoothed, 1e-12))
        if pair:  # two members: no peer majority to outvote a one-window spike, so median
            smoothed = np.array([np.median(self._values[m]) for m in ready])
            logs = np.log(np.maximum(smoothed, 1e-12))
            return self._observe_pair(window, ready, logs, smoothed)
        median = float(np.median(logs))
        mad = float(np.median(np.abs(logs - median))) * MAD_TO_SIGMA
        # Pool the spread over recent windows: 64 peers give a noisy MAD on their own.
        self._sigmas.append(mad)
        sigma = max(float(np.median(self._sigmas)), cfg.mad_floor, 1e-12)
        scores = (logs - median) / sigma
        effects = np.exp(logs - median) - 1.0
        newly = self._persistent(window, ready, scores, effects, smoothed)
        peers = {"median": float(np.exp(median)), "sigma": sigma, "members": len(ready)}
        return self._attribute(window, newly, ready, scores, effects, peers)

    def _observe_pair(
        self, window: int, ready: list[Hashable], logs: np.ndarray, smoothed: np.ndarray
    ) -> list[Detection]:
        """Two-member mode (see the module doc): own-baseline slowdowns, compared."""
        cfg = self.config
        # Each member against the others (load shared by all hosts cancels out), relative to
        # what that difference was during the baseline windows.
        diff = np.array([logs[i] - np.mean(np.delete(logs, i)) for i in range(len(ready))])
        for m in ready:
            self._baseline.setdefault(m, [])
        if any(len(self._baseline[m]) < cfg.baseline_windows for m in ready):
            for m, d in zip(ready, diff, strict=True):
                if len(self._baseline[m]) < cfg.baseline_windows:
                    self._baseline[m].append(float(d))
            return []
        base = np.array([np.median(self._baseline[m]) for m in ready])
        spread = np.array(
            [np.median(np.abs(np.array(self._baseline[m]) - b)) for m, b in zip(ready, base, strict=True)]
        ) * MAD_TO_SIGMA  # fmt: skip
        sigma = max(float(np.max(spread)), cfg.mad_floor, 1e-12)
        if cfg.pair_max_sigma is not None:
            sigma = min(sigma, cfg.pair_max_sigma)
        rel = diff - base  # slowdown vs the others, beyond the baseline difference
        scores, effects = rel / sigma, np.exp(rel) - 1.0
        newly = self._persistent(
            window, ready, scores, effects, smoothed, max(cfg.min_effect, cfg.pair_min_effect)
        )
        peers = {
            "median": float(np.exp(np.min(logs))),
            "sigma": sigma,
            "members": len(ready),
            "mode": "own baseline (two members)",  # vs the other, then vs baseline
        }
        return self._attribute(window, newly, ready, scores, effects, peers)

    def _persistent(
        self,
        window: int,
        ready: list[Hashable],
        scores: np.ndarray,
        effects: np.ndarray,
        smoothed: np.ndarray,
        min_effect: float | None = None,
    ) -> list[Hashable]:
        """Flag this window's members, keep their trace; return those now persistent."""
        cfg = self.config
        least = cfg.min_effect if min_effect is None else min_effect
        newly: list[Hashable] = []
        for m, z, eff, val in zip(ready, scores, effects, smoothed, strict=True):
            flagged = bool(z >= cfg.threshold and eff >= least)
            flags = self._flags.setdefault(m, deque(maxlen=cfg.persist_n))
            flags.append(flagged)
            self._trace.setdefault(m, deque(maxlen=cfg.persist_n)).append(
                {
                    "window": window,
                    "value": round(float(val), 6),
                    "score": round(float(z), 3),
                    "effect": round(float(eff), 4),
                    "flagged": flagged,
                }
            )
            if sum(flags) >= cfg.persist_k:
                newly.append(m)
        return newly

    def _attribute(
        self,
        window: int,
        persistent: list[Hashable],
        ready: list[Hashable],
        scores: np.ndarray,
        effects: np.ndarray,
        peers: dict[str, Any],
    ) -> list[Detection]:
        index = {m: i for i, m in enumerate(ready)}
        by_node: dict[str, list[Hashable]] = {}
        for m in ready:
            by_node.setdefault(self._node(m), []).append(m)
        out: list[Detection] = []
        slow_nodes = set()
        for node, node_members in by_node.items():
            # A node is blamed once one of its ranks is persistent and most of them are slow
            # (flagged recently, or at least min_effect slower now): ranks of one slow host
            # cross the line a window or two apart, and the first must not be reported alone.
            suspect = [
                m
                for m in node_members
                if any(self._flags.get(m, ())) or effects[index[m]] >= self.config.min_effect
            ]
            if (
                len(node_members) > 1
                and any(m in persistent for m in node_members)
                and len(suspect) >= self.config.node_fraction * len(node_members)
            ):
                slow_nodes.add(node)
                if f"node:{node}" in self._reported:
                    continue
                self._reported.add(f"node:{node}")
                out.append(
                    Detection(
                        level="node",
                        target=node,
                        node=node,
                        members=tuple(str(m) for m in node_members),
                        window=window,
                        score=float(max(scores[index[m]] for m in node_members)),
                        effect=float(np.mean([effects[index[m]] for m in node_members])),
                        evidence=self._evidence(node_members, peers),
                    )
                )
        for m in persistent:
            node = self._node(m)
            if node in slow_nodes or {f"node:{node}", f"member:{m}"} & self._reported:
                continue
            self._reported.add(f"member:{m}")
            out.append(
                Detection(
                    level="rank",
                    target=str(m),
                    node=node,
                    members=(str(m),),
                    window=window,
                    score=float(scores[index[m]]),
                    effect=float(effects[index[m]]),
                    evidence=self._evidence([m], peers),
                )
            )
        return out

    def _node(self, member: Hashable) -> str:
        return self._nodes.get(member, str(member))

    def _evidence(self, members: list[Hashable], peers: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        pair = "mode" in peers
        least = max(cfg.min_effect, cfg.pair_min_effect) if pair else cfg.min_effect
        return {
            "peer_median": round(peers["median"], 6),
            "peer_sigma": round(peers["sigma"], 6),
            "peers": int(peers["members"]),
            "mode": peers.get("mode", "peer median"),
            "rule": (
                f"z >= {cfg.threshold} and effect >= {least:.0%} in "
                f"{cfg.persist_k} of {cfg.persist_n} windows (smoothed over "
                f"{cfg.smooth_windows}, warm-up {cfg.warmup_windows})"
            ),
            "windows": {str(m): list(self._trace[m]) for m in members},
        }
