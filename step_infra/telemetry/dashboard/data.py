"""The dashboard's JSON documents, cut from an aggregated :class:`RunModel` and the events.

Sized for what a screen shows, not for what the store holds, so a 4,096-rank x 1,000-step
run costs the browser a few hundred kB:

* ``heatmap``: one row per rank up to :data:`RANK_ROWS_MAX` ranks, else one row per node
  (its slowest rank: a node is as slow as its slowest rank in a synchronous job), with
  steps averaged into at most :data:`MAX_COLUMNS` bins; values are each cell's ratio to that
  step's median over all ranks, one byte a cell (:func:`encode_ratios`, base64). A node's
  own ranks come from :func:`node_doc` (``/api/node``), the drill-down.
* ``ranks``: the top-N slowest ranks (plus every flagged one), not all of them.
* ``sections``: compute next to the waits (other sections, and the time waited *inside*
  each collective) for the median rank and the slowest ranks.
* ``evict_panel``: detections, would-evict verdicts, deferrals, evictions and recoveries.

The heatmap figure is compute time when a ``compute`` section is recorded, else step time (a
step that ends in an all-reduce lasts as long on every rank and hides the slow one).
"""

from __future__ import annotations

import base64
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from step_infra.telemetry.dashboard.aggregate import (
    HEAT_SECTION,
    RECENT_STEPS,
    RunModel,
    StoreAggregator,
)
from step_infra.telemetry.events import read_events

TOP_N = 20  # rows of the slowest-ranks table
RANK_ROWS_MAX = 64  # up to this many ranks the heatmap has a row per rank, above it per node
MAX_COLUMNS = 250  # heatmap columns: steps are averaged into at most this many bins
MAX_POINTS = 500  # points of each per-step chart
SECTION_ROWS = 12  # bars of the time-per-section panel
EVIDENCE_INLINE_BYTES = 4096  # larger evidence is fetched on demand (/api/event?i=)
MAX_EVENTS = 500  # most recent events listed
PANEL_EVENTS = ("detection", "would_evict", "eviction_deferred", "eviction", "straggler_recovered")
LISTED_EVENTS = (
    *PANEL_EVENTS,
    "restart", "join", "recovered", "hang", "job_start", "job_end", "resumed", "pipe_fault",
)  # fmt: skip
# Heatmap cells: ratio = RATIO_MIN + code / RATIO_STEPS, code 255 = no value.
RATIO_MIN, RATIO_STEPS, NO_VALUE = 0.5, 200.0, 255


def encode_ratios(ratio: np.ndarray) -> str:
    """One byte per cell (ratio 0.5 .. 1.77 in steps of 0.005; 255 = none), base64: a
    512 x 250 heatmap is 171 kB of text instead of ~1 MB of JSON numbers."""
    codes = np.clip(np.rint((ratio - RATIO_MIN) * RATIO_STEPS), 0, NO_VALUE - 1)
    codes = np.where(np.isnan(ratio), NO_VALUE, codes).astype(np.uint8)
    return base64.b64encode(codes.tobytes()).decode("ascii")


def decode_heatmap(heat: dict[str, Any]) -> np.ndarray:
    """The (rows, columns) ratios of a heatmap document (NaN where none), for Python users."""
    codes = np.frombuffer(base64.b64decode(heat["values"]), dtype=np.uint8)
    codes = codes.reshape(len(heat["rows"]), len(heat["steps"]))
    return np.where(codes == NO_VALUE, np.nan, RATIO_MIN + codes / RATIO_STEPS)


def _bins(matrix: np.ndarray, steps: np.ndarray, max_columns: int) -> tuple[np.ndarray, list, int]:
    """Average consecutive steps into at most ``max_columns`` bins: (binned, first step of
    each bin, steps per bin)."""
    width = max(1, math.ceil(matrix.shape[1] / max_columns))
    pad = (-matrix.shape[1]) % width
    padded = np.pad(matrix, ((0, 0), (0, pad)), constant_values=np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an empty bin stays NaN
        binned = np.nanmean(padded.reshape(matrix.shape[0], -1, width), axis=2)
    return binned, [int(s) for s in steps[::width]], width


def _node_max(model: RunModel) -> np.ndarray:
    """(nodes, steps): per step, the ratio of each node's slowest rank."""
    order = np.argsort(model.member_node, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(model.member_node[order]) != 0])
    return np.fmax.reduceat(model.ratio[order], starts, axis=0)


def heatmap_doc(
    model: RunModel, members: np.ndarray | None = None, *, max_columns: int = MAX_COLUMNS
) -> dict[str, Any]:
    """The heatmap: ``members`` (indices) one row each, or by default every rank (small
    jobs) or every node (its slowest rank)."""
    empty: dict[str, Any] = {
        "metric": model.metric,
        "level": "rank",
        "rows": [],
        "steps": [],
        "values": "",
    }
    if not len(model.steps) or not len(model.members):
        return empty
    if members is None and len(model.members) > RANK_ROWS_MAX:
        level, rows = "node", [model.nodes[i] for i in np.unique(model.member_node)]
        matrix = _node_max(model)
    else:
        idx = np.arange(len(model.members)) if members is None else members
        level, rows, matrix = "rank", [model.members[i] for i in idx], model.ratio[idx]
    binned, starts, width = _bins(matrix, model.steps, max_columns)
    return {
        "metric": model.metric,
        "level": level,
        "rows": rows,
        "steps": starts,
        "bin_steps": width,
        "last_step": int(model.steps[-1]),
        "values": encode_ratios(binned),
        "encoding": f"base64 uint8: ratio = {RATIO_MIN} + code / {RATIO_STEPS:g}, "
        f"{NO_VALUE} = none",
    }


def _ms(value: float) -> float | None:
    return None if math.isnan(value) else round(1e3 * float(value), 2)


def member_flags(
    model: RunModel, events: list[dict[str, Any]], straggler_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """(straggler, evicted) per member: named by a detection, or slower than
    ``straggler_threshold`` over its recent steps; on a node that was evicted."""
    detections = [e for e in events if e.get("event") == "detection"]
    # A node-level detection flags every rank of the node; a rank-level one names its member
    # (a rank number, or the node name when the detector compared nodes of one rank each).
    slow_nodes = {e.get("node") for e in detections if e.get("level") == "node"}
    targets = {str(e.get("target")) for e in detections if e.get("level") != "node"}
    evicted_nodes = {e.get("node") for e in events if e.get("event") == "eviction"}
    node_names = np.array(model.nodes, dtype=object)[model.member_node]
    named = np.array(
        [
            node in slow_nodes or str(rank) in targets or node in targets
            for node, rank in zip(node_names, model.member_rank, strict=True)
        ],
        dtype=bool,
    )
    with np.errstate(invalid="ignore"):
        slow = model.slowdown >= straggler_threshold
    evicted = np.array([node in evicted_nodes for node in node_names], dtype=bool)
    return named | slow, evicted


def rank_rows(
    model: RunModel, idx: np.ndarray, straggler: np.ndarray, evicted: np.ndarray
) -> list[dict[str, Any]]:
    """Rows of a ranks table for the members ``idx``."""
    out = []
    for i in idx.tolist():
        slow = float(model.slowdown[i])
        out.append(
            {
                "member": model.members[i],
                "rank": int(model.member_rank[i]),
                "node": model.nodes[model.member_node[i]],
                "active": bool(model.active[i]),
                "slowdown": None if math.isnan(slow) else round(slow, 4),
                "straggler": bool(straggler[i]),
                "evicted": bool(evicted[i]),
                "late_ms": _ms(model.late_s[i]),
                "wait_ms": _ms(model.wait_s[i]),
            }
        )
    return out


def slowest(model: RunModel, n: int, also: np.ndarray) -> np.ndarray:
    """The ``n`` members slower than their peers by the most, then every member in ``also``
    (flagged ones) not among them; NaN sorts last."""
    key = np.where(np.isnan(model.slowdown), -np.inf, model.slowdown)
    order = np.argsort(-key, kind="stable")
    top = order[:n]
    seen = set(top.tolist())
    extra = [i for i in np.flatnonzero(also) if i not in seen][: 4 * RANK_ROWS_MAX]
    return np.concatenate([top, np.array(extra, dtype=top.dtype)])


def sections_doc(model: RunModel, idx: np.ndarray, *, with_median: bool) -> dict[str, Any]:
    """Mean seconds per step: compute next to the other sections (waits) and the time waited
    inside each collective, for members ``idx`` (and first the median over all ranks)."""
    sec, coll = model.sections, model.collectives
    columns: list[dict[str, str]] = []
    parts = set(model.compute_parts)
    if HEAT_SECTION in sec.columns:
        inside = f" (= {' + '.join(model.compute_parts)})" if parts else ""
        columns.append({"name": HEAT_SECTION, "kind": "compute", "label": "compute" + inside})
    for name in sec.columns:
        if name != HEAT_SECTION and name not in parts:
            columns.append({"name": name, "kind": "section", "label": name})
    for name in coll.columns:
        columns.append({"name": name, "kind": "collective", "label": f"waited in {name}"})
    if not columns:
        return {"columns": [], "rows": [], "mean_s": []}
    table = np.column_stack(
        [(sec if c["kind"] != "collective" else coll)[c["name"]].to_numpy() for c in columns]
    )
    rows = [model.members[i] for i in idx.tolist()]
    values = table[idx]
    if with_median:
        rows = ["median rank", *rows]
        values = np.vstack([np.median(table, axis=0), values])
    return {
        "columns": columns,
        "rows": rows,
        "mean_s": [[round(float(v), 6) for v in r] for r in values],
    }


def series_doc(model: RunModel, max_points: int = MAX_POINTS) -> dict[str, Any]:
    """Per-step job charts, averaged into at most ``max_points`` points each."""
    out = {}
    for name, (steps, values) in model.series.items():
        if len(steps) > max_points:
            binned, starts, _ = _bins(values[None, :].astype(float), steps, max_points)
            steps, values = np.array(starts), binned[0]
        out[name] = {
            "step": [int(s) for s in steps],
            "value": [None if math.isnan(v) else float(f"{v:.5g}") for v in values.tolist()],
        }
    return out


def events_doc(
    events: list[dict[str, Any]], *, full_evidence: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(listed events, evict panel rows). Each carries ``i``, its line in events.jsonl; a
    large evidence is left out (``evidence_bytes`` says how large) unless ``full_evidence``."""
    listed = []
    for i, ev in enumerate(events):
        if ev.get("event") not in LISTED_EVENTS:
            continue
        ev = {**ev, "i": i}
        if "evidence" in ev and not full_evidence:
            size = len(json.dumps(ev["evidence"], default=str))
            if size > EVIDENCE_INLINE_BYTES:
                ev["evidence"], ev["evidence_bytes"] = None, size
        listed.append(ev)
    listed = listed[-MAX_EVENTS:]
    panel = []
    for ev in reversed(listed):
        if ev["event"] not in PANEL_EVENTS:
            continue
        panel.append(
            {
                "i": ev["i"],
                "event": ev["event"],
                "t_unix_s": ev.get("t_unix_s"),
                "step": ev.get("step", ev.get("last_step")),
                "node": ev.get("node"),
                "level": ev.get("level"),
                "target": None if ev.get("target") is None else str(ev["target"]),
                "saving_s": ev.get("saving_s"),
                "cost_s": ev.get("cost_s"),
                "score": ev.get("score"),
                "effect": ev.get("effect"),
                "action": ev.get("action"),
                "reason": ev.get("reason"),
            }
        )
    return listed, panel


def summary_doc(
    model: RunModel,
    events: list[dict[str, Any]],
    *,
    run: str,
    top_n: int = TOP_N,
    straggler_threshold: float = 0.1,
    full_evidence: bool = False,
) -> dict[str, Any]:
    """The page's main document (``/api/run``)."""
    straggler, evicted = member_flags(model, events, straggler_threshold)
    listed, panel = events_doc(events, full_evidence=full_evidence)
    n = len(model.members)
    table = slowest(model, top_n, straggler | evicted)
    few = n <= 16  # every rank gets a bar; else the median rank and the slowest ones
    bars = np.arange(n) if few else slowest(model, SECTION_ROWS - 1, np.zeros(n, bool))
    heat = heatmap_doc(model)
    flagged = straggler | evicted
    if heat["level"] == "node":
        names = {model.nodes[model.member_node[i]] for i in np.flatnonzero(flagged)}
    else:
        names = {model.members[i] for i in np.flatnonzero(flagged)}
    heat["flagged"] = [row for row in heat["rows"] if row in names]
    return {
        "run": run,
        "rows": model.rows,
        "parts": model.parts,
        "ranks_total": n,
        "nodes_total": len(model.nodes),
        "stragglers_total": int(straggler.sum()),
        "attempt": model.attempt,
        "dropped_records": model.dropped_records,
        "recent_steps": RECENT_STEPS,
        "ranks": rank_rows(model, table, straggler, evicted),
        "heatmap": heat,
        "sections": sections_doc(model, bars, with_median=not few),
        "series": series_doc(model),
        "events": listed,
        "evict_panel": panel,
        "as_of_unix_s": round(time.time(), 3),
    }


def node_doc(
    model: RunModel,
    events: list[dict[str, Any]],
    node: str,
    *,
    straggler_threshold: float = 0.1,
) -> dict[str, Any] | None:
    """The drill-down of one node (``/api/node?name=``): its ranks' heatmap, table and
    sections; None if the run has no such node."""
    idx = model.node_members(node)
    if not len(idx):
        return None
    straggler, evicted = member_flags(model, events, straggler_threshold)
    return {
        "node": node,
        "ranks": rank_rows(model, idx, straggler, evicted),
        "heatmap": heatmap_doc(model, idx, max_columns=2 * MAX_COLUMNS),
        "sections": sections_doc(model, idx, with_median=True),
    }


def summarize_run(
    run_dir: str | Path,
    *,
    straggler_threshold: float = 0.1,
    top_n: int = TOP_N,
    full_evidence: bool = False,
) -> dict[str, Any]:
    """The dashboard's main document for ``run_dir``, read from scratch (works while the run
    is still writing; the live server keeps an incremental :class:`StoreAggregator`)."""
    run_dir = Path(run_dir)
    agg = StoreAggregator(str(run_dir))
    agg.refresh()
    return summary_doc(
        agg.model(),
        read_events(run_dir),
        run=run_dir.name,
        top_n=top_n,
        straggler_threshold=straggler_threshold,
        full_evidence=full_evidence,
    )
