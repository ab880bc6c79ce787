"""The dashboard's server-side aggregation: store parts -> per-batch partials -> a run model.

Why it is built this way: at 4,096 ranks x 1,000 steps a store holds about 45 M rows (eleven
a rank a step). Neither the rows nor a rank x step table of them fits a browser, and reading
them all again on every refresh of a live run would take the server seconds each time. Parts
never change once renamed into place, so every batch of parts is read once and reduced to a
:class:`Partial` -- sums and counts per group (pandas groupby), plus the one value per rank per
step that the heatmap and the lateness need, in compact dtypes -- and kept. A refresh reads
only the parts written since; :meth:`StoreAggregator.model` merges the partials (numpy, one
matrix per figure) into a :class:`RunModel`, from which ``data.py`` cuts the small JSON
documents the page fetches.

Members are keyed by (node, rank): after a restart the same rank number may belong to
another node. Later attempts re-run steps after a resume: per (member, step) the latest
attempt's value is kept.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from step_infra.telemetry.store import read_parts, store_parts

HEAT_SECTION = "compute"  # the per-rank figure compared across ranks (a rank's own work)
RECENT_STEPS = 20  # a member's "now": its last 20 steps with a value
BATCH_BYTES = 24 << 20  # parts read together: ~2.5 M rows, whatever the size of each part
_WAIT_WORDS = ("wait", "sync", "stall", "idle")  # a section so named is never inside compute


@dataclass(slots=True, kw_only=True)
class Partial:
    """What one batch of parts contributes; ``member`` columns index the aggregator's
    member table."""

    rows: int
    heat_metric: str  # HEAT_SECTION, or "step" when the batch recorded no such section
    heat: pd.DataFrame  # member, attempt, step, value (float32)
    arrivals: pd.DataFrame  # member, attempt, step, name (id), t_unix_s, value (waited inside)
    sections: pd.DataFrame  # kind (section | arrival), name, member, sum, count
    per_step: pd.DataFrame  # kind, name, step, attempt, sum, count, max


@dataclass(slots=True, kw_only=True)
class RunModel:
    """A run, aggregated: everything the dashboard shows, as arrays indexed by member."""

    rows: int
    parts: int
    members: list[str]  # "node/rN"
    member_node: np.ndarray  # index into ``nodes``
    member_rank: np.ndarray
    nodes: list[str]
    active: np.ndarray  # bool: the member wrote rows in the latest attempt
    attempt: int
    metric: str | None  # None until some step was recorded
    steps: np.ndarray  # heat columns (step numbers, sorted)
    heat: np.ndarray  # (members, steps) seconds, NaN where missing
    ratio: np.ndarray  # heat / that step's median over all members
    slowdown: np.ndarray  # per member: median ratio over its recent steps, minus 1
    late_s: np.ndarray  # per member: mean time it arrived after the first, recent steps
    wait_s: np.ndarray  # per member: mean time it waited inside collectives, recent steps
    sections: pd.DataFrame  # index member id; columns section names; mean s per step
    collectives: pd.DataFrame  # index member id; columns collective names; mean s waited
    compute_parts: list[str]  # sections that add up to HEAT_SECTION (inside it)
    series: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (steps, values)
    dropped_records: float

    def node_members(self, node: str) -> np.ndarray:
        """Member indices of ``node`` (empty if unknown)."""
        if node not in self.nodes:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.member_node == self.nodes.index(node))


@dataclass(slots=True)
class _Members:
    """The member table shared by all partials: (node, rank) -> id, and the latest attempt
    each member wrote rows in."""

    ids: dict[tuple[str, int], int] = field(default_factory=dict)
    max_attempt: list[int] = field(default_factory=list)
    names: dict[str, int] = field(default_factory=dict)  # collective name -> id

    def collective_codes(self, categories: pd.Index) -> np.ndarray:
        """Global ids of a batch's name categories (arrival rows keep an int, not a string)."""
        for name in categories:
            self.names.setdefault(str(name), len(self.names))
        return np.array([self.names[str(c)] for c in categories], dtype=np.int16)

    def codes(self, df: pd.DataFrame) -> np.ndarray:
        """A member id for every row of ``df`` (columns node, rank, attempt)."""
        key = df["node"].cat.codes.to_numpy().astype(np.int64) << 32 | df["rank"].to_numpy()
        inverse, uniq = pd.factorize(key)
        cats = df["node"].cat.categories
        local = np.empty(len(uniq), dtype=np.int32)
        for i, k in enumerate(uniq.tolist()):
            ident = (str(cats[k >> 32]), int(k & 0xFFFFFFFF))
            if ident not in self.ids:
                self.ids[ident] = len(self.ids)
                self.max_attempt.append(-1)
            local[i] = self.ids[ident]
        attempt = df["attempt"].to_numpy()
        top = np.full(len(uniq), int(attempt.min()) if len(attempt) else 0)
        if len(attempt) and attempt.max() != attempt.min():
            np.maximum.at(top, inverse, attempt)
        for m, a in zip(local.tolist(), top.tolist(), strict=True):
            self.max_attempt[m] = max(self.max_attempt[m], a)
        return local[inverse]


def _sums(key: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group rows by an integer ``key``: (keys, sum, count). A bincount over factorized
    keys: an order of magnitude cheaper than a groupby on categorical columns at 2.5 M rows."""
    inverse, keys = pd.factorize(key)
    total = np.bincount(inverse, weights=value, minlength=len(keys))
    count = np.bincount(inverse, minlength=len(keys))
    return keys, total, count


def _partial(df: pd.DataFrame, members: _Members) -> Partial:
    """Reduce one batch of rows (all columns of the store) to its :class:`Partial`."""
    member = members.codes(df)
    kinds, names = df["kind"].cat, df["name"].cat
    kind_code, name_code = kinds.codes.to_numpy(), names.codes.to_numpy()
    kind_of = {k: i for i, k in enumerate(kinds.categories)}
    name_of = {k: i for i, k in enumerate(names.categories)}
    step, attempt = df["step"].to_numpy(), df["attempt"].to_numpy()
    value, t_unix_s = df["value"].to_numpy(), df["t_unix_s"].to_numpy()
    is_section = kind_code == kind_of.get("section", -2)
    is_arrival = kind_code == kind_of.get("arrival", -2)
    heat_rows = is_section & (name_code == name_of.get(HEAT_SECTION, -2))
    metric = HEAT_SECTION
    if not heat_rows.any():
        heat_rows, metric = kind_code == kind_of.get("step", -2), "step"
    heat = pd.DataFrame(
        {
            "member": member[heat_rows],
            "attempt": attempt[heat_rows].astype(np.int16),
            "step": step[heat_rows].astype(np.int32),
            "value": value[heat_rows].astype(np.float32),
        }
    )
    arrivals = pd.DataFrame(
        {
            "member": member[is_arrival],
            "attempt": attempt[is_arrival].astype(np.int16),
            "step": step[is_arrival].astype(np.int32),
            "name": members.collective_codes(names.categories)[name_code[is_arrival]],
            "t_unix_s": t_unix_s[is_arrival],
            "value": value[is_arrival].astype(np.float32),
        }
    )
    kind_name = kind_code.astype(np.int64) * len(name_of) + name_code
    timed = is_section | is_arrival
    keys, total, count = _sums(kind_name[timed] << 32 | member[timed], value[timed])
    sections = pd.DataFrame(
        {
            "kind": kinds.categories[(keys >> 32) // len(name_of)].astype(str),
            "name": names.categories[(keys >> 32) % len(name_of)].astype(str),
            "member": (keys & 0xFFFFFFFF).astype(np.int64),
            "sum": total,
            "count": count,
        }
    )
    other = ~timed
    frame = pd.DataFrame(
        {
            "kn": kind_name[other],
            "step": step[other],
            "attempt": attempt[other],
            "value": value[other],
        }
    )
    g = frame.groupby(["kn", "step", "attempt"], sort=False)["value"].agg(["sum", "count", "max"])
    g = g.reset_index()
    kn = g.pop("kn").to_numpy()
    g.insert(0, "name", names.categories[kn % len(name_of)].astype(str))
    g.insert(0, "kind", kinds.categories[kn // len(name_of)].astype(str))
    return Partial(
        rows=len(df),
        heat_metric=metric,
        heat=heat,
        arrivals=arrivals,
        sections=sections,
        per_step=g,
    )


def _batches(parts: list[tuple[str, int]]) -> list[list[str]]:
    """Group parts into reads of about :data:`BATCH_BYTES` each: a Recorder writes one small
    part per rank per window (hundreds of thousands at scale), the synthetic store one large
    part per node; per-read overhead and per-read memory both stay bounded."""
    out: list[list[str]] = []
    size = BATCH_BYTES
    for path, nbytes in parts:
        if size + nbytes > BATCH_BYTES and (not out or out[-1]):
            out.append([])
            size = 0
        out[-1].append(path)
        size += nbytes
    return [b for b in out if b]


class StoreAggregator:
    """Incremental reader of one run's store: :meth:`refresh` reads parts not seen before,
    :meth:`model` merges everything read so far."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self._seen: set[str] = set()
        self._members = _Members()
        self._partials: list[Partial] = []

    def refresh(self) -> int:
        """Read the parts written since the last call; return how many."""
        new = [(p, n) for p, n in store_parts(self.run_dir) if p not in self._seen]
        for batch in _batches(new):
            try:
                table = read_parts(batch)
            except FileNotFoundError:  # a part vanished (store cleaned): skip this round
                continue
            self._seen.update(batch)
            if table.num_rows:
                self._partials.append(_partial(table.to_pandas(), self._members))
        if len(self._partials) > 64:  # a long live run: fold the small partials into one
            self._partials = [_concat_partials(self._partials)]
        return len(new)

    def model(self) -> RunModel:
        """Merge the partials read so far into a :class:`RunModel`."""
        return _merge(self._concat(), self._members, parts=len(self._seen))

    def _concat(self) -> Partial:
        return _concat_partials(self._partials)


def _concat_partials(partials: list[Partial]) -> Partial:
    if not partials:
        return _partial_empty()
    metric = HEAT_SECTION if any(p.heat_metric == HEAT_SECTION for p in partials) else "step"
    use = [p for p in partials if p.heat_metric == metric]
    return Partial(
        rows=sum(p.rows for p in partials),
        heat_metric=metric,
        heat=pd.concat([p.heat for p in use], ignore_index=True),
        arrivals=pd.concat([p.arrivals for p in partials], ignore_index=True),
        sections=pd.concat([p.sections for p in partials], ignore_index=True)
        .groupby(["kind", "name", "member"], as_index=False)[["sum", "count"]]
        .sum(),
        per_step=pd.concat([p.per_step for p in partials], ignore_index=True)
        .groupby(["kind", "name", "step", "attempt"], as_index=False)
        .agg({"sum": "sum", "count": "sum", "max": "max"}),
    )


def _partial_empty() -> Partial:
    cols: dict[str, list[float]] = {"member": [], "attempt": [], "step": [], "value": []}
    return Partial(
        rows=0,
        heat_metric="step",
        heat=pd.DataFrame(cols),
        arrivals=pd.DataFrame({**cols, "name": [], "t_unix_s": []}),
        sections=pd.DataFrame(columns=["kind", "name", "member", "sum", "count"]),
        per_step=pd.DataFrame(columns=["kind", "name", "step", "attempt", "sum", "count", "max"]),
    )


def _latest_attempt(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Rows of the latest attempt per ``keys`` (a no-op, and free, when there was one)."""
    if df.empty or df["attempt"].min() == df["attempt"].max():
        return df
    top = df.groupby(keys)["attempt"].transform("max")
    return df[df["attempt"] == top]


def _matrix(
    member: np.ndarray,
    col: np.ndarray,
    value: np.ndarray,
    shape: tuple[int, int],
    *,
    mean: bool = False,
) -> np.ndarray:
    """Sum (or average) ``value`` into a (members, steps) matrix, NaN where nothing landed."""
    flat = member.astype(np.int64) * shape[1] + col
    size = shape[0] * shape[1]
    total = np.bincount(flat, weights=value.astype(np.float64), minlength=size)
    count = np.bincount(flat, minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(count > 0, total / count if mean else total, np.nan)
    return out.reshape(shape).astype(np.float32)


def recent(values: np.ndarray, n: int = RECENT_STEPS, *, how: str = "median") -> np.ndarray:
    """Per row, the median (or mean) of its last ``n`` non-NaN values (NaN if none): a member
    that left the job keeps the figure of its own last steps, not an empty one."""
    ok = ~np.isnan(values)
    from_end = np.cumsum(ok[:, ::-1], axis=1)[:, ::-1]
    kept = np.where(ok & (from_end <= n), values, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows with no value: NaN is right
        return (np.nanmedian if how == "median" else np.nanmean)(kept, axis=1)


def _compute_parts(means: pd.DataFrame) -> list[str]:
    """Sections that together make up the compute section (a breakdown, e.g. fwd + bwd +
    optimizer): the subset whose per-member sum matches compute within 0.5 % for every
    member. Sections named like a wait never count (a coincidence must not hide a wait)."""
    if HEAT_SECTION not in means.columns:
        return []
    compute = means[HEAT_SECTION].to_numpy()
    names = [
        c
        for c in means.columns
        if c != HEAT_SECTION and not any(w in c.lower() for w in _WAIT_WORDS)
    ][:12]
    for size in range(len(names), 0, -1):
        for subset in itertools.combinations(names, size):
            total = means[list(subset)].to_numpy().sum(axis=1)
            if np.all(np.abs(total - compute) <= 5e-3 * np.abs(compute) + 1e-9):
                return list(subset)
    return []


def _series(per_step: pd.DataFrame) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    """Per-step job figures (latest attempt of each step) and the dropped-record count."""
    df = _latest_attempt(per_step, ["kind", "name", "step"]) if len(per_step) else per_step
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def pick(kind: str, name: str, how: str = "mean") -> pd.Series:
        sel = df[(df["kind"] == kind) & (df["name"] == name)]
        g = sel.groupby("step")[["sum", "count"]].sum().sort_index()
        return g["sum"] if how == "sum" else g["sum"] / g["count"]

    step_time = pick("step", "step")
    out["step_time_s"] = (step_time.index.to_numpy(), step_time.to_numpy())
    wait = pick("gauge", "data_wait_s")
    stall = (wait / step_time).dropna()
    out["data_stall_fraction"] = (stall.index.to_numpy(), stall.to_numpy())
    for key, how in (("tokens_per_s", "sum"), ("mfu", "mean"), ("loss", "mean")):
        s = pick("gauge", key, how)
        out[key] = (s.index.to_numpy(), s.to_numpy())
    dropped = df[(df["kind"] == "gauge") & (df["name"] == "dropped_records")]["max"]
    return out, float(dropped.max()) if len(dropped) else 0.0


def _merge(p: Partial, members: _Members, *, parts: int) -> RunModel:
    """One :class:`RunModel` from the concatenated partials."""
    idents = sorted(members.ids, key=lambda ident: members.ids[ident])
    n = len(idents)
    nodes = sorted({node for node, _ in idents}, key=lambda s: (len(s), s))
    node_index = {node: i for i, node in enumerate(nodes)}
    member_node = np.array([node_index[node] for node, _ in idents], dtype=np.int64)
    member_rank = np.array([rank for _, rank in idents], dtype=np.int64)
    max_attempt = np.array(members.max_attempt, dtype=np.int64)
    attempt = int(max_attempt.max()) if n else 0

    heat = _latest_attempt(p.heat, ["member", "step"])
    steps = np.unique(heat["step"].to_numpy()) if len(heat) else np.zeros(0, dtype=np.int64)
    shape = (n, len(steps))
    col = np.searchsorted(steps, heat["step"].to_numpy())
    matrix = _matrix(heat["member"].to_numpy(), col, heat["value"].to_numpy(), shape, mean=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a step nobody recorded: NaN
        median = np.nanmedian(matrix, axis=0) if n else np.zeros(0)
    ratio = matrix / median
    late, wait = _lateness(p.arrivals, shape, steps)

    means = p.sections.assign(mean=p.sections["sum"] / p.sections["count"].clip(lower=1))
    sec = means[means["kind"] == "section"].pivot(index="member", columns="name", values="mean")
    coll = means[means["kind"] == "arrival"].pivot(index="member", columns="name", values="mean")
    series, dropped = _series(p.per_step)
    return RunModel(
        rows=p.rows,
        parts=parts,
        members=[f"{node or 'rank'}/r{rank}" for node, rank in idents],
        member_node=member_node,
        member_rank=member_rank,
        nodes=nodes,
        active=max_attempt == attempt,
        attempt=attempt,
        metric=p.heat_metric if len(steps) else None,
        steps=steps,
        heat=matrix,
        ratio=ratio,
        slowdown=recent(ratio) - 1.0,
        late_s=late,
        wait_s=wait,
        sections=sec.reindex(range(n)).fillna(0.0) if len(sec) else pd.DataFrame(index=range(n)),
        collectives=coll.reindex(range(n)).fillna(0.0)
        if len(coll)
        else pd.DataFrame(index=range(n)),
        compute_parts=_compute_parts(sec.dropna()) if len(sec) else [],
        series=series,
        dropped_records=dropped,
    )


def _lateness(
    arrivals: pd.DataFrame, shape: tuple[int, int], steps: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per member, recent mean of (arrived late, waited inside) summed over a step's
    collectives.

    Lateness is the time after the first member reached the same collective of the same step
    (and attempt): the straggler arrives last and waits least. Arrival times are wall clocks,
    so across hosts this assumes synchronised clocks (NTP/PTP, well under a step).
    """
    n = shape[0]
    if arrivals.empty or n == 0:
        return np.full(n, np.nan), np.full(n, np.nan)
    arr = _latest_attempt(arrivals, ["member", "step", "name"])
    t = arr["t_unix_s"].to_numpy()
    first = arr.groupby(["attempt", "step", "name"], sort=False)["t_unix_s"].transform("min")
    all_steps = np.union1d(steps, np.unique(arr["step"].to_numpy()))
    col = np.searchsorted(all_steps, arr["step"].to_numpy())
    m = arr["member"].to_numpy()
    size = (n, len(all_steps))
    late = _matrix(m, col, t - first.to_numpy(), size)
    wait = _matrix(m, col, arr["value"].to_numpy(), size)
    return recent(late, how="mean"), recent(wait, how="mean")
