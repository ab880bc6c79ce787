"""Record kinds and per-window aggregation (p50 / p90 / max per section).

The hot path stores plain tuples (cheapest to build); the exporter thread turns a window of
steps into a :class:`Window`: aggregates that go to metrics (a handful of series per section,
safe under OpenTelemetry's cardinality limits) and the per-step, per-rank detail rows that
go to the local store. Quantiles come from numpy, not hand-written code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np


class Kind(IntEnum):
    """What a record measures; the store keeps the lower-case name."""

    SECTION = 0  # value: host or CUDA-event duration of a timed section, seconds
    COUNTER = 1  # value: increment
    GAUGE = 2  # value: last observed value
    ARRIVAL = 3  # value: seconds waited inside a collective; t: arrival time at it
    STEP = 4  # value: step wall time, seconds (marks the step as complete)


# (kind, name, step, value, t_unix_ns)
Record = tuple[int, str, int, float, int]

DETAIL_COLUMNS = ("step", "rank", "node", "attempt", "kind", "name", "value", "t_unix_s")


@dataclass(frozen=True, slots=True, kw_only=True)
class Stats:
    """Distribution of one section's durations (or any value) over a window."""

    count: int
    p50: float
    p90: float
    max: float
    total: float

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        arr = np.asarray(values, dtype=np.float64)
        p50, p90 = np.percentile(arr, [50.0, 90.0])
        return cls(
            count=int(arr.size),
            p50=float(p50),
            p90=float(p90),
            max=float(arr.max()),
            total=float(arr.sum()),
        )


@dataclass(slots=True, kw_only=True)
class Window:
    """One exported window of one rank: aggregates plus per-step detail rows."""

    rank: int
    node: str
    attempt: int
    first_step: int
    last_step: int
    sections: dict[str, Stats] = field(default_factory=dict)
    arrivals: dict[str, Stats] = field(default_factory=dict)  # wait time inside collectives
    counters: dict[str, float] = field(default_factory=dict)  # sums over the window
    gauges: dict[str, float] = field(default_factory=dict)  # last value in the window
    step_time: Stats | None = None
    step_times: list[float] = field(default_factory=list)
    dropped: int = 0  # records dropped by the ring buffer so far (cumulative)
    detail: dict[str, list] = field(default_factory=dict)  # columns of DETAIL_COLUMNS

    @property
    def steps(self) -> int:
        return self.last_step - self.first_step + 1


def build_window(
    records: list[Record],
    *,
    rank: int,
    node: str,
    attempt: int,
    dropped: int,
    extra_gauges: dict[str, float] | None = None,
) -> Window:
    """Aggregate ``records`` (all from one rank, one or more complete steps) into a window."""
    if not records:
        raise ValueError("build_window needs at least one record, got an empty list")
    sections: dict[str, list[float]] = {}
    arrivals: dict[str, list[float]] = {}
    counters: dict[str, float] = {}
    gauges: dict[str, float] = {}
    step_times: list[float] = []
    cols: dict[str, list] = {c: [] for c in DETAIL_COLUMNS}
    kind_names = {k.value: k.name.lower() for k in Kind}
    first = last = records[0][2]
    for kind, name, step, value, t_ns in records:
        first = min(first, step)
        last = max(last, step)
        if kind == Kind.SECTION:
            sections.setdefault(name, []).append(value)
        elif kind == Kind.ARRIVAL:
            arrivals.setdefault(name, []).append(value)
        elif kind == Kind.COUNTER:
            counters[name] = counters.get(name, 0.0) + value
        elif kind == Kind.GAUGE:
            gauges[name] = value
        elif kind == Kind.STEP:
            step_times.append(value)
        cols["step"].append(step)
        cols["kind"].append(kind_names[kind])
        cols["name"].append(name)
        cols["value"].append(value)
        cols["t_unix_s"].append(t_ns / 1e9)
    for name, value in (extra_gauges or {}).items():
        gauges[name] = value
        cols["step"].append(last)
        cols["kind"].append("gauge")
        cols["name"].append(name)
        cols["value"].append(value)
        cols["t_unix_s"].append(records[-1][4] / 1e9)
    n = len(cols["step"])
    cols["rank"] = [rank] * n
    cols["node"] = [node] * n
    cols["attempt"] = [attempt] * n
    return Window(
        rank=rank,
        node=node,
        attempt=attempt,
        first_step=first,
        last_step=last,
        sections={k: Stats.of(v) for k, v in sections.items()},
        arrivals={k: Stats.of(v) for k, v in arrivals.items()},
        counters=counters,
        gauges=gauges,
        step_time=Stats.of(step_times) if step_times else None,
        step_times=step_times,
        dropped=dropped,
        detail=cols,
    )
