"""Turn the store's per-step rows into detector windows: one value per node per step.

The controller tails ``telemetry.parquet`` (see :class:`~step_infra.telemetry.store.StoreTail`)
and, for each step every active node has reported, feeds the detector the p50 of the
compute-only section across that node's ranks. Steps are keyed by (attempt, step) so rows of
a step re-run after a restart never mix with the first run.

A node may have no compute at a step (its replica was assigned none of that step's samples),
so a step also counts as complete for a node once that node has reported any later step: the
step is released with the nodes that have a value, instead of holding every later step back
(which left a demo run's detector without a single window).
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd


class StepFeed:
    """Collects per-node section times and releases complete steps in order."""

    def __init__(self, *, section: str = "compute") -> None:
        self.section = section
        self._values: dict[tuple[int, int], dict[str, list[float]]] = {}
        self._released: set[tuple[int, int]] = set()
        self._progress: dict[tuple[int, str], int] = {}  # (attempt, node) -> latest step seen

    def add(self, rows: pd.DataFrame) -> None:
        if rows.empty:
            return
        latest = rows.groupby(["attempt", "node"])["step"].max()
        for (attempt, node), step in latest.items():
            seen = (int(attempt), str(node))
            self._progress[seen] = max(self._progress.get(seen, -1), int(step))
        sel = rows[(rows["kind"] == "section") & (rows["name"] == self.section)]
        for attempt, step, node, value in zip(
            sel["attempt"], sel["step"], sel["node"], sel["value"], strict=True
        ):
            key = (int(attempt), int(step))
            if key in self._released:
                continue
            self._values.setdefault(key, {}).setdefault(str(node), []).append(float(value))

    def complete(self, nodes: Iterable[str]) -> list[tuple[int, int, dict[str, float]]]:
        """Steps (in order) for which every node in ``nodes`` has a value (or has moved past
        them: see the module doc); each released once.

        A step is released only if every earlier pending step of the same attempt is complete
        too, so the detector sees windows in order.
        """
        wanted = set(nodes)
        out = []
        for key in sorted(self._values):
            per_node = self._values[key]
            attempt, step = key
            if any(
                n not in per_node and self._progress.get((attempt, n), -1) <= step for n in wanted
            ):
                break
            values = {n: float(pd.Series(per_node[n]).median()) for n in wanted if n in per_node}
            out.append((attempt, step, values))
            self._released.add(key)
            del self._values[key]
        return out

    def drop_attempts_before(self, attempt: int) -> None:
        """Forget unreleased steps of earlier attempts (their nodes may be gone)."""
        for key in [k for k in self._values if k[0] < attempt]:
            del self._values[key]
