"""``StragglerDetector``: which rank (or node) is *persistently* slower than its peers.

Input: one value per member (rank) per training step, normally that rank's compute-only time
(:meth:`StragglerDetector.observe` with a mapping, or :meth:`observe_array` with a vector, NaN
where a rank has no value). What a real cluster's noise does, and what each choice answers:

* **job-wide slow phases** (a data stall, a checkpoint, a busy file system) slow every rank
  together: each step's values are taken relative to that step's median over all ranks, so a
  phase shared by everyone never blames anyone;
* **single-step spikes, GC pauses, one-step node hiccups**: steps are cut into windows of
  ``window_steps`` and a window's statistic is the *median* of its steps (a mean keeps one
  2-5x spike in every window it touches); a transient must cover most of a window to count;
* **persistence on independent windows**: windows do not overlap, and a member is convicted
  when ``persist_k`` of its last ``persist_n`` windows are *each* slow on their own (robust z
  over the peers >= ``threshold`` and at least ``min_effect`` slower), the latest included.
  A sustained slowdown flags every window; an intermittent one (slow bursts) still collects
  ``persist_k``; noise rarely flags even one window;
* **robust peer score**: a window's value is compared with the median over the peers and
  scaled by the MAD (x 1.4826, sigma under normal noise) of the same statistic, pooled (median)
  over the last ``sigma_windows`` windows. Because the spread is measured on the very
  statistic that is scored, correlated (step-to-step) jitter that does not average out within
  a window widens the spread the member is judged against instead of flagging it;
* **ranks and nodes**: the same scoring runs on ranks and on nodes (a node's value is the
  median of its ranks'). A node's ranks share host jitter, so a slow node can hide in the rank
  spread but stands out among nodes; a single slow rank stands out among ranks even where it
  moves its node's median little. A rank detection is raised to its node when most of the
  node's ranks are slow too (the host is the cause and the unit of eviction);
* **two members** (a level with exactly two, e.g. the nodes of a 2-node job): a median of two
  cannot say which one is slow, so the pair is scored on the log-ratio of the two, against
  zero (healthy nodes of one job do the same work), scaled by that ratio's spread over the
  older windows (MAD, a constant offset does not widen it), with a larger effect required
  (``pair_min_effect``): a node slow from the first step is found, load shared by both cancels.

Everything per step is vectorized numpy over the ranks (no per-member Python work except for
a detection's evidence), so 4,096 ranks cost well under a millisecond a step
(``benchmarks/telemetry_detection.py`` measures it).
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution is 0.6745 sigma


@dataclass(frozen=True, slots=True, kw_only=True)
class DetectorConfig:
    """Thresholds of the straggler detector (defaults: see benchmarks/telemetry_detection.py)."""

    warmup_steps: int = 10  # steps ignored at the start (compilation, allocator, pipe fill)
    window_steps: int = 5  # steps per scored window; its statistic is their median
    threshold: float = 4.0  # robust z a window must reach to count as slow
    min_effect: float = 0.05  # ... and at least this much slower than the peer median
    persist_k: int = 4  # slow windows needed ...
    persist_n: int = 8  # ... among the member's last persist_n windows (the latest slow)
    sigma_windows: int = 16  # windows over which the peer spread is pooled
    node_fraction: float = 0.75  # fraction of a node's ranks slow to blame the node
    mad_floor: float = 0.005  # spread (of log values) never taken below this
    min_members: int = 3  # fewest members for a peer-median comparison
    # Below this many members a peer median is a weak majority (4 ranks of a 2 x 2 job: a
    # healthy rank 7 % off was convicted in 4 of 30 noisy runs): ask for pair_min_effect.
    small_level: int = 8
    # Two members have no majority to tell jitter from a straggler: ask for a larger effect
    # (a +9 % blip on a shared 2-core host was seen; a slow node worth evicting is >= 15 %).
    pair_min_effect: float = 0.15
    pair_baseline_windows: int = 3  # two-member mode: older windows needed to measure spread
    # Two members on a noisy host: a spread measured on a few windows can be so wide that no
    # slowdown reaches the threshold; a cap makes ``threshold x pair_max_sigma`` enough.
    pair_max_sigma: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.persist_k <= self.persist_n:
            raise ValueError(
                f"need 1 <= persist_k <= persist_n, got persist_k={self.persist_k}, "
                f"persist_n={self.persist_n}"
            )
        for name in ("window_steps", "min_members", "sigma_windows", "pair_baseline_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"DetectorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.pair_max_sigma is not None and self.pair_max_sigma <= 0:
            raise ValueError(f"pair_max_sigma must be > 0 or None, got {self.pair_max_sigma}")
        if self.warmup_steps < 0 or self.threshold <= 0 or self.min_effect < 0:
            raise ValueError(
                "warmup_steps must be >= 0, threshold > 0 and min_effect >= 0; got "
                f"{self.warmup_steps}, {self.threshold}, {self.min_effect}"
            )
        if not 0 < self.node_fraction <= 1:
            raise ValueError(f"node_fraction must be in (0, 1], got {self.node_fraction}")

    def rule(self, least: float) -> str:
        """The conviction rule in words (written into every detection's evidence)."""
        return (
            f"z >= {self.threshold:g} and >= {least:.0%} slower in {self.persist_k} of the last "
            f"{self.persist_n} windows of {self.window_steps} steps (window = median step, "
            f"warm-up {self.warmup_steps} steps)"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Detection:
    """A persistent straggler, with the evidence that convicted it."""

    level: str  # "rank" or "node"
    target: str  # the node name for level == "node", else the member id as a string
    node: str  # the node hosting it (what an eviction stops)
    members: tuple[str, ...]
    window: int  # the step at which persistence was reached
    score: float  # robust z of the latest window (max over members for a node)
    effect: float  # relative slowdown vs the peers (median over its slow windows)
    extra_s: float = 0.0  # seconds a step the job waits for it (effect x peer median time)
    evidence: dict[str, Any] = field(default_factory=dict)


class _Level:
    """Scoring of one level (ranks or nodes): window values -> z, effect, slow flags."""

    def __init__(self, config: DetectorConfig) -> None:
        self.cfg = config
        n = config.persist_n
        self.size = 0
        self.flags = np.zeros((n, 0), dtype=bool)  # ring of the last n windows
        self.scores = np.full((n, 0), np.nan)
        self.effects = np.full((n, 0), np.nan)
        self.values = np.full((n, 0), np.nan)  # the windows' raw medians (seconds)
        self.steps: deque[int] = deque(maxlen=n)
        self.head = 0  # next row of the rings
        self.deviations: deque[np.ndarray] = deque(maxlen=config.sigma_windows)
        self.pair_diffs: deque[float] = deque(maxlen=config.sigma_windows + n)
        self.pair_ids: tuple[int, int] | None = None
        self.mode = "peer median"
        self.sigma = float("nan")
        self.least = config.min_effect  # the effect the latest window asked for

    def grow(self, size: int) -> None:
        if size <= self.size:
            return
        pad = ((0, 0), (0, size - self.size))
        self.flags = np.pad(self.flags, pad, constant_values=False)
        self.scores = np.pad(self.scores, pad, constant_values=np.nan)
        self.effects = np.pad(self.effects, pad, constant_values=np.nan)
        self.values = np.pad(self.values, pad, constant_values=np.nan)
        self.size = size

    def score(
        self, step: int, logs: np.ndarray, raw: np.ndarray, *, pair_floor: float = 0.0
    ) -> np.ndarray:
        """Score one window (log residuals and raw medians, NaN = absent); return the
        indices of members persistent now."""
        cfg = self.cfg
        present = np.flatnonzero(~np.isnan(logs))
        z = np.full(self.size, np.nan)
        effect = np.full(self.size, np.nan)
        least = cfg.min_effect
        if len(present) >= cfg.min_members:
            self.mode = "peer median"
            if len(present) < cfg.small_level:
                least = max(cfg.min_effect, cfg.pair_min_effect)
            vals = logs[present]
            if 4 <= len(present) < cfg.small_level:
                # Few members: each against the median of the *others* (leave-one-out). A
                # median of 4 that includes the member itself sits close to every value, so
                # deviations (and the spread pooled from them) come out too small. (With 3,
                # the others' median is a mean of 2 that a straggler would pull: not there.)
                dev = np.array([v - np.median(np.delete(vals, i)) for i, v in enumerate(vals)])
            else:
                dev = vals - float(np.median(vals))
            # Pool the deviations themselves over recent windows (not a median of per-window
            # MADs: the MAD of 8 nodes is biased low and noisy; 16 windows x 8 is a sample).
            self.deviations.append(np.abs(dev))
            pooled = np.concatenate(self.deviations)
            self.sigma = max(float(np.median(pooled)) * MAD_TO_SIGMA, cfg.mad_floor)
            z[present] = dev / self.sigma
            effect[present] = np.expm1(dev)
        elif len(present) == 2:
            least = max(cfg.min_effect, cfg.pair_min_effect)
            self._score_pair(present, logs, z, effect, pair_floor)
        row = self.head % cfg.persist_n
        self.head += 1
        self.steps.append(step)
        self.least = least
        flagged = (z >= cfg.threshold) & (effect >= least)  # NaN compares False
        self.flags[row] = flagged
        self.scores[row] = z
        self.effects[row] = effect
        self.values[row] = raw
        persistent = flagged & (self.flags.sum(axis=0) >= cfg.persist_k)
        return np.flatnonzero(persistent)

    def _score_pair(
        self,
        present: np.ndarray,
        logs: np.ndarray,
        z: np.ndarray,
        effect: np.ndarray,
        floor: float,
    ) -> None:
        cfg = self.cfg
        a, b = (int(i) for i in present)
        if self.pair_ids != (a, b):  # a new pair: its history says nothing about this one
            self.pair_ids = (a, b)
            self.pair_diffs.clear()
        self.mode = "log ratio of the two (two members)"
        diff = float(logs[a] - logs[b])
        self.pair_diffs.append(diff)
        # The spread of the ratio over the older windows (the ones not being judged now).
        older = list(self.pair_diffs)[: -cfg.persist_n] or []
        if len(older) < cfg.pair_baseline_windows:
            older = list(self.pair_diffs)[:-1]
            if len(older) < cfg.pair_baseline_windows:
                return
        arr = np.array(older)
        sigma = float(np.median(np.abs(arr - np.median(arr)))) * MAD_TO_SIGMA
        # A ratio that drifts slowly (correlated jitter) looks steady over a few windows; the
        # spread its members' ranks show (``floor``, from the node level) bounds it from below.
        sigma = max(sigma, cfg.mad_floor, floor)
        if cfg.pair_max_sigma is not None:
            sigma = min(sigma, cfg.pair_max_sigma)
        self.sigma = sigma
        z[a], z[b] = diff / sigma, -diff / sigma
        effect[a], effect[b] = np.expm1(diff), np.expm1(-diff)

    def recent_effect(self, index: int) -> float:
        """Median slowdown over the member's slow windows among the last persist_n."""
        sel = self.flags[:, index]
        vals = self.effects[sel, index] if sel.any() else self.effects[:, index]
        vals = vals[~np.isnan(vals)]
        return float(np.median(vals)) if len(vals) else 0.0

    def slow_count(self, index: int) -> int:
        return int(self.flags[:, index].sum()) if index < self.size else 0

    def latest(self, ring: np.ndarray, index: int) -> float:
        v = float(ring[(self.head - 1) % self.cfg.persist_n, index])
        return 0.0 if v != v else v

    def trace(self, index: int) -> list[dict[str, Any]]:
        """The member's last windows, oldest first (what an SRE reads in the evidence)."""
        n = self.cfg.persist_n
        rows = [(self.head - len(self.steps) + i) % n for i in range(len(self.steps))]
        return [
            {
                "step": step,
                "value": None if np.isnan(self.values[r, index]) else round(float(self.values[r, index]), 6),
                "score": None if np.isnan(self.scores[r, index]) else round(float(self.scores[r, index]), 2),
                "effect": None if np.isnan(self.effects[r, index]) else round(float(self.effects[r, index]), 4),
                "flagged": bool(self.flags[r, index]),
            }
            for step, r in zip(self.steps, rows, strict=True)
        ]  # fmt: skip


class StragglerDetector:
    """Feed :meth:`observe` (or :meth:`observe_array`) one value per rank for every step."""

    def __init__(
        self, config: DetectorConfig | None = None, *, nodes: Mapping[Any, str] | None = None
    ) -> None:
        self.config = config or DetectorConfig()
        self._node_names = {k: str(v) for k, v in (nodes or {}).items()}
        self.reset()

    def reset(self) -> None:
        """Forget history (after a restart the membership and its timings change)."""
        cfg = self.config
        self._members: list[Hashable] = []
        self._index: dict[Hashable, int] = {}
        self._node_of: list[int] = []  # member index -> node index
        self._nodes: list[str] = []
        self._node_index: dict[str, int] = {}
        self._steps_seen = 0
        self._last_members: tuple[Hashable, ...] = ()
        self._last_idx = np.zeros(0, dtype=np.int64)
        self._buffer: list[np.ndarray] = []  # this window's per-step log residuals
        self._raw: list[np.ndarray] = []  # ... and raw values (for the evidence)
        self._window_raw = np.zeros(0)
        self._ranks = _Level(cfg)
        self._hosts = _Level(cfg)
        self._reported: set[str] = set()
        self._within: deque[np.ndarray] = deque(maxlen=cfg.sigma_windows)
        self._held: dict[int, int] = {}  # rank -> windows its report waited for its node
        self._peer_times: deque[float] = deque(maxlen=cfg.sigma_windows)
        self._peer_time = 0.0  # peers' median value, median over recent windows (seconds)

    def set_node(self, member: Hashable, node: str) -> None:
        self._node_names[member] = str(node)
        if member in self._index:
            self._node_of[self._index[member]] = self._node_id(str(node))

    # ------------------------------------------------------------------ membership
    def _node_id(self, node: str) -> int:
        if node not in self._node_index:
            self._node_index[node] = len(self._nodes)
            self._nodes.append(node)
        return self._node_index[node]

    def _indices(self, members: Sequence[Hashable]) -> np.ndarray:
        out = np.empty(len(members), dtype=np.int64)
        for i, m in enumerate(members):
            idx = self._index.get(m)
            if idx is None:
                idx = self._index[m] = len(self._members)
                self._members.append(m)
                self._node_of.append(self._node_id(self._node_names.get(m, str(m))))
            out[i] = idx
        return out

    # ---------------------------------------------------------------------- input
    def observe(self, step: int, values: Mapping[Any, float]) -> list[Detection]:
        """One step: ``member -> value``. Returns detections that became persistent now."""
        members = list(values)
        return self.observe_array(step, members, np.fromiter(values.values(), float, len(members)))

    def observe_array(
        self,
        step: int,
        members: Sequence[Hashable],
        values: np.ndarray,
        nodes: Sequence[str] | None = None,
    ) -> list[Detection]:
        """One step as a vector aligned with ``members`` (NaN: no value from that member);
        ``nodes`` (aligned too) names the host of a member not seen before."""
        cfg = self.config
        self._steps_seen += 1
        if self._steps_seen <= cfg.warmup_steps:
            return []
        key = members if isinstance(members, tuple) else tuple(members)
        if key != self._last_members:  # membership is the same step after step: map it once
            if nodes is not None:
                for m, n in zip(key, nodes, strict=True):
                    if m not in self._index:
                        self._node_names[m] = str(n)
            self._last_members, self._last_idx = key, self._indices(key)
        idx = self._last_idx
        size = len(self._members)
        row = np.full(size, np.nan)
        vals = np.asarray(values, dtype=float)
        row[idx] = np.where(vals > 0, vals, np.nan)
        logs = np.log(row)
        if np.count_nonzero(~np.isnan(logs)) >= 2:
            logs -= np.nanmedian(logs)  # job-wide slowness cancels here
        self._buffer.append(logs)
        self._raw.append(row)
        if len(self._buffer) < cfg.window_steps:
            return []
        return self._close_window(step)

    # ---------------------------------------------------------------------- windows
    def _close_window(self, step: int) -> list[Detection]:
        size = len(self._members)
        stack = np.full((len(self._buffer), size), np.nan)
        raw = np.full_like(stack, np.nan)
        for i, (b, r) in enumerate(zip(self._buffer, self._raw, strict=True)):
            stack[i, : len(b)], raw[i, : len(r)] = b, r
        self._buffer.clear()
        self._raw.clear()
        # A member needs a value in most of the window's steps for the median to be robust.
        enough = np.count_nonzero(~np.isnan(stack), axis=0) * 2 > stack.shape[0]
        with np.errstate(all="ignore"):
            rank_logs = np.where(enough, _nanmedian_cols(stack), np.nan)
            self._window_raw = _nanmedian_cols(raw)
        if enough.any():  # a typical peer time: median over recent windows (phases pass)
            self._peer_times.append(float(np.nanmedian(self._window_raw)))
            self._peer_time = float(np.median(self._peer_times))
        self._ranks.grow(size)
        rank_hits = self._ranks.score(step, rank_logs, self._window_raw)
        self._hosts.grow(len(self._nodes))
        multi = self._ranks_per_node() > 1
        node_hits = np.zeros(0, dtype=np.int64)
        if multi:
            node_logs = self._node_values(rank_logs)
            node_hits = self._hosts.score(
                step,
                node_logs,
                self._node_values(self._window_raw),
                pair_floor=self._node_ratio_floor(rank_logs, node_logs),
            )
        return self._attribute(step, rank_hits, node_hits, multi)

    def _node_ratio_floor(self, rank_logs: np.ndarray, node_logs: np.ndarray) -> float:
        """The spread of the log ratio of two nodes that their ranks' own jitter implies.

        Each rank's deviation from its node's median measures rank-level jitter without any
        node offset (pooled over recent windows); the ratio of two nodes' medians of ``k``
        ranks each then spreads by about ``sigma_rank * sqrt(2 / k)``. Used as a floor for the
        two-member mode, whose temporal spread misses slow (correlated) drifts.
        """
        node_of = np.asarray(self._node_of)
        k = self._ranks_per_node()
        dev = rank_logs - node_logs[node_of]
        dev = dev[~np.isnan(dev)]
        if k < 2 or len(dev) == 0:
            return 0.0
        self._within.append(np.abs(dev))
        sigma_rank = float(np.median(np.concatenate(self._within))) * MAD_TO_SIGMA
        sigma_rank *= np.sqrt(k / (k - 1))  # deviations from a median of k shrink by this
        return sigma_rank * float(np.sqrt(2.0 / k))

    def _node_values(self, per_rank: np.ndarray) -> np.ndarray:
        """Median over each node's ranks (NaN for a node with none present)."""
        node_of = np.asarray(self._node_of)
        counts = np.bincount(node_of, minlength=len(self._nodes))
        width = int(counts.max()) if len(counts) else 0
        table = np.full((len(self._nodes), max(width, 1)), np.nan)
        order = np.argsort(node_of, kind="stable")
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        slot = np.arange(len(order)) - starts[node_of[order]]
        table[node_of[order], slot] = per_rank[order]
        with np.errstate(all="ignore"):
            return _nanmedian_cols(table.T)

    def _ranks_per_node(self) -> int:
        return int(np.bincount(np.asarray(self._node_of)).max()) if self._node_of else 0

    # ---------------------------------------------------------------- attribution
    def _attribute(
        self, step: int, rank_hits: np.ndarray, node_hits: np.ndarray, multi: bool
    ) -> list[Detection]:
        cfg = self.config
        node_of = np.asarray(self._node_of)
        blamed_nodes = {int(n) for n in node_hits}
        # A persistent rank whose node mates are mostly slow too names its node.
        for r in rank_hits:
            n = int(node_of[r])
            on_node = np.flatnonzero(node_of == n)
            slow = sum(self._ranks.slow_count(int(m)) > 0 for m in on_node)
            if multi and len(on_node) > 1 and slow >= cfg.node_fraction * len(on_node):
                blamed_nodes.add(n)
        out: list[Detection] = []
        for n in sorted(blamed_nodes):
            name = self._nodes[n]
            if f"node:{name}" in self._reported:
                continue
            self._reported.add(f"node:{name}")
            mates = [int(m) for m in np.flatnonzero(node_of == n)]
            level = self._hosts if n < self._hosts.size and self._hosts.slow_count(n) else None
            effect = (
                level.recent_effect(n)
                if level is not None
                else float(np.median([self._ranks.recent_effect(m) for m in mates]))
            )
            score = max(self._ranks.latest(self._ranks.scores, m) for m in mates)
            if level is not None:
                score = max(score, level.latest(level.scores, n))
            out.append(
                Detection(
                    level="node",
                    target=name,
                    node=name,
                    members=tuple(str(self._members[m]) for m in mates),
                    window=step,
                    score=score,
                    effect=effect,
                    extra_s=self._extra_seconds(mates, effect),
                    evidence=self._evidence(mates, node=n),
                )
            )
        for r in rank_hits:
            r = int(r)
            name = self._nodes[int(node_of[r])]
            member = str(self._members[r])
            if (
                int(node_of[r]) in blamed_nodes
                or {f"node:{name}", f"member:{member}"} & self._reported
            ):
                continue
            if self._node_slowing(r, node_of) and self._held.get(r, 0) < cfg.persist_n:
                # Its mates are slower together: the node is crossing the line rank by rank;
                # wait (a few windows at most) for the node's detection instead.
                self._held[r] = self._held.get(r, 0) + 1
                continue
            self._reported.add(f"member:{member}")
            effect = self._ranks.recent_effect(r)
            out.append(
                Detection(
                    level="rank",
                    target=member,
                    node=name,
                    members=(member,),
                    window=step,
                    score=self._ranks.latest(self._ranks.scores, r),
                    effect=effect,
                    extra_s=self._extra_seconds([r], effect),
                    evidence=self._evidence([r], node=None),
                )
            )
        return out

    def _extra_seconds(self, members: list[int], effect: float) -> float:
        """Seconds a step the job waits for ``members``: ``effect`` times the typical time of
        everyone else (median over the recent windows of their median; a job-wide slow phase
        in one window does not inflate it, and the members' own slowness is left out)."""
        values = self._ranks.values
        others = np.ones(values.shape[1], dtype=bool)
        others[members] = False
        if not others.any():
            return 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            typical = float(np.nanmedian(np.nanmedian(values[:, others], axis=1)))
        return max(0.0, effect * typical) if typical == typical else 0.0

    def _node_slowing(self, rank: int, node_of: np.ndarray) -> bool:
        """Whether the other ranks of ``rank``'s node are, on median, slow in this window."""
        mates = np.flatnonzero((node_of == node_of[rank]) & (np.arange(len(node_of)) != rank))
        if len(mates) == 0:
            return False
        row = self._ranks.effects[(self._ranks.head - 1) % self.config.persist_n, mates]
        row = row[~np.isnan(row)]
        return bool(len(row)) and float(np.median(row)) >= self.config.min_effect / 2

    def _evidence(self, members: list[int], *, node: int | None) -> dict[str, Any]:
        level = self._hosts if node is not None and node < self._hosts.size else self._ranks
        out: dict[str, Any] = {
            "peer_median_s": round(self._peer_time, 6),
            "peer_sigma": round(self._ranks.sigma, 6),
            "peers": int(np.count_nonzero(~np.isnan(self._window_raw))),
            "mode": self._ranks.mode,
            "rule": self.config.rule(level.least),
            "windows": {str(self._members[m]): self._ranks.trace(m) for m in members},
        }
        if node is not None and node < self._hosts.size:
            out["node_mode"] = self._hosts.mode
            out["node_sigma"] = round(self._hosts.sigma, 6)
            out["node_windows"] = self._hosts.trace(node)
        return out

    # ------------------------------------------------------------------ queries
    def still_slow(self, target: str, *, level: str = "rank") -> bool:
        """Whether ``target`` still has at least ``persist_k`` slow windows among the last
        ``persist_n`` (the controller drops a pending eviction of one that recovered)."""
        k = self.config.persist_k
        if level == "node":
            n = self._node_index.get(target)
            if n is None:
                return False
            if self._hosts.slow_count(n) >= k:
                return True
            mates = np.flatnonzero(np.asarray(self._node_of) == n)
            return any(self._ranks.slow_count(int(m)) >= k for m in mates)
        idx = next((i for i, m in enumerate(self._members) if str(m) == target), None)
        return idx is not None and self._ranks.slow_count(idx) >= k

    @property
    def windows_scored(self) -> int:
        """Windows scored since the last reset (a new one every ``window_steps`` steps)."""
        return self._ranks.head

    def member_nodes(self) -> dict[str, str]:
        """Each member (as a string) and the node that hosts it."""
        return {str(m): self._nodes[n] for m, n in zip(self._members, self._node_of, strict=True)}

    def latest_scores(self) -> dict[str, float]:
        """Robust z of every rank in the latest window (for gauges and dashboards)."""
        if self._ranks.head == 0:
            return {}
        row = self._ranks.scores[(self._ranks.head - 1) % self.config.persist_n]
        return {str(m): float(z) for m, z in zip(self._members, row, strict=False) if z == z}


def _nanmedian_cols(a: np.ndarray) -> np.ndarray:
    """Column-wise median ignoring NaN; all-NaN columns give NaN without a warning."""
    if a.size == 0:
        return np.full(a.shape[1] if a.ndim == 2 else 0, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "All-NaN slice encountered"
        return np.nanmedian(a, axis=0)
