"""Everything the dashboard shows, computed from a run directory with pandas.

One JSON-ready dict: the ranks (with their node and how much slower than their peers they
are), a per-rank x per-step heatmap of compute time (or step time when no compute section is
recorded: a step that ends in an all-reduce lasts as long on every rank and hides the slow
one), mean time per section per rank, the data-stall fraction, throughput, MFU, loss, and the
events with their evidence.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from step_infra.telemetry.events import read_events
from step_infra.telemetry.store import read_store

MAX_STEPS = 400  # heatmap columns: the most recent steps, enough for a screen


def _clean(values: Any) -> list[float | None]:
    return [
        None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values
    ]


def _per_step(df: pd.DataFrame, name: str, *, how: str = "mean") -> dict[str, list]:
    sel = df[df["name"] == name]
    if sel.empty:
        return {"step": [], "value": []}
    series = sel.groupby("step")["value"].agg(how).sort_index()
    return {"step": [int(s) for s in series.index], "value": _clean(series.to_numpy())}


def arrival_lateness(df: pd.DataFrame) -> pd.DataFrame:
    """How late each member reaches each collective, vs the first member to arrive.

    Columns: attempt, step, name (the collective), member, lateness_s. The straggler is the
    member that arrives last (and waits least): a section ending in the collective would
    show the same duration on every rank, its arrival time does not. Arrival times are wall
    clocks, so across hosts this assumes synchronised clocks (NTP/PTP, well under a step).
    """
    arr = df[df["kind"] == "arrival"]
    if arr.empty:
        return pd.DataFrame(columns=["attempt", "step", "name", "member", "lateness_s"])
    first = arr.groupby(["attempt", "step", "name"])["t_unix_s"].transform("min")
    out = arr.assign(lateness_s=arr["t_unix_s"] - first)
    return out[["attempt", "step", "name", "member", "lateness_s"]]


def summarize_run(
    run_dir: str | Path, *, straggler_threshold: float = 0.1, rows: pd.DataFrame | None = None
) -> dict[str, Any]:
    """The dashboard's data for ``run_dir`` (works while the run is still writing).

    ``rows`` are the store's rows when the caller already holds them (the live server reads
    only new parts on each refresh); by default the whole store is read.
    """
    run_dir = Path(run_dir)
    df = read_store(run_dir) if rows is None else rows
    events = read_events(run_dir)
    out: dict[str, Any] = {
        "run": run_dir.name,
        "rows": len(df),
        "ranks": [],
        "heatmap": {"metric": None, "steps": [], "rows": [], "values": []},
        "sections": {"names": [], "rows": [], "mean_s": []},
        "series": {},
        "events": events,
    }
    if df.empty:
        return out
    # After a restart the same rank number may belong to another node: key rows by both.
    df = df.assign(
        member=df["node"].where(df["node"] != "", "rank") + "/r" + df["rank"].astype(str)
    )
    latest = int(df["attempt"].max())
    sections = df[df["kind"] == "section"]
    metric = "compute" if (sections["name"] == "compute").any() else None
    heat_src = sections[sections["name"] == metric] if metric else df[df["kind"] == "step"]
    metric = metric or "step"
    # Later attempts re-run steps after a resume: keep the latest value per (member, step).
    heat_src = heat_src.sort_values("attempt").drop_duplicates(["member", "step"], keep="last")
    pivot = heat_src.pivot_table(index="member", columns="step", values="value", aggfunc="median")
    pivot = pivot.iloc[:, -MAX_STEPS:]
    # Slowdown of each member vs the per-step median of its peers, over its last 5 steps.
    ratio = pivot / pivot.median(axis=0)
    recent = ratio.apply(lambda row: row.dropna().tail(5).median(), axis=1)
    detections = [e for e in events if e.get("event") == "detection"]
    # A node-level detection flags every rank of the node; a rank-level one names its member
    # (a rank number, or the node name when the detector compared nodes of one rank each).
    slow_nodes = {e.get("node") for e in detections if e.get("level") == "node"}
    slow_targets = {str(e.get("target")) for e in detections if e.get("level") != "node"}
    evicted = {e.get("node") for e in events if e.get("event") == "eviction"}
    members = df.drop_duplicates("member").set_index("member")
    late = arrival_lateness(df)
    late_by_member = late.groupby("member")["lateness_s"].apply(lambda v: v.tail(20).mean())
    ranks = []
    for member in pivot.index:
        row = members.loc[member]
        node = str(row["node"])
        slow = float(recent.get(member, float("nan")))
        ranks.append(
            {
                "member": member,
                "rank": int(row["rank"]),
                "node": node,
                "active": bool((df[df["member"] == member]["attempt"] == latest).any()),
                "slowdown": None if math.isnan(slow) else round(slow - 1.0, 4),
                "straggler": node in slow_nodes
                or str(row["rank"]) in slow_targets
                or node in slow_targets
                or (not math.isnan(slow) and slow - 1.0 >= straggler_threshold),
                "evicted": node in evicted,
                "late_ms": None
                if member not in late_by_member.index
                else round(1e3 * float(late_by_member[member]), 2),
            }
        )
    out["ranks"] = ranks
    out["heatmap"] = {
        "metric": metric,
        "steps": [int(s) for s in pivot.columns],
        "rows": list(pivot.index),
        "values": [_clean(r) for r in pivot.to_numpy()],
    }
    stacked = sections
    if metric != "step" and (sections["name"] != metric).any():
        stacked = sections[sections["name"] != metric]  # it encloses the others: no double count
    sec = stacked.groupby(["member", "name"])["value"].mean().unstack("name").fillna(0.0)
    out["sections"] = {
        "names": list(sec.columns),
        "rows": list(sec.index),
        "mean_s": [_clean(r) for r in sec.to_numpy()],
    }
    # Steps re-run after a resume: the series keep each step's latest attempt only.
    df = df[df["attempt"] == df.groupby("step")["attempt"].transform("max")]
    step_time = df[df["kind"] == "step"].groupby("step")["value"].mean()
    wait = df[df["name"] == "data_wait_s"].groupby("step")["value"].mean()
    stall = (wait / step_time).dropna().sort_index()
    loss_src = df[(df["name"] == "loss")].sort_values("attempt")
    loss_src = loss_src.drop_duplicates(["step", "rank"], keep="last")
    out["series"] = {
        "step_time_s": {
            "step": [int(s) for s in step_time.index],
            "value": _clean(step_time.to_numpy()),
        },
        "data_stall_fraction": {
            "step": [int(s) for s in stall.index],
            "value": _clean(stall.to_numpy()),
        },
        "tokens_per_s": _per_step(df, "tokens_per_s", how="sum"),
        "mfu": _per_step(df, "mfu"),
        "loss": _per_step(loss_src, "loss"),
    }
    out["attempt"] = latest
    out["dropped_records"] = (
        float(df[df["name"] == "dropped_records"]["value"].max())
        if (df["name"] == "dropped_records").any()
        else 0.0
    )
    return out
