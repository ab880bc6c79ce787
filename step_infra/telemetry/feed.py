"""Turn the store's per-step rows into detector windows: one value per node per step.

The controller tails ``telemetry.parquet`` (see :class:`~step_infra.telemetry.store.StoreTail`)
and, for each step every active node has reported, feeds the detector the p50 of the
compute-only section across that node's ranks. Steps are keyed by (attempt, step) so rows of
a step re-run after a restart never mix with the first run.
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

    def add(self, rows: pd.DataFrame) -> None:
        if rows.empty:
            return
        sel = rows[(rows["kind"] == "section") & (rows["name"] == self.section)]
        for attempt, step, node, value in zip(
            sel["attempt"], sel["step"], sel["node"], sel["value"], strict=True
        ):
            key = (int(attempt), int(step))
            if key in self._released:
                continue
            self._values.setdefault(key, {}).setdefault(str(node), []).append(float(value))

    def complete(self, nodes: Iterable[str]) -> list[tuple[int, int, dict[str, float]]]:
        """Steps (in order) for which every node in ``nodes`` has a value; each released once.

        A step is released only if every earlier pending step of the same attempt is complete
        too, so the detector sees windows in order.
        """
        wanted = set(nodes)
        out = []
        for key in sorted(self._values):
            per_node = self._values[key]
            if not wanted.issubset(per_node):
                break
            values = {n: float(pd.Series(per_node[n]).median()) for n in wanted}
            out.append((key[0], key[1], values))
            self._released.add(key)
            del self._values[key]
        return out

    def drop_attempts_before(self, attempt: int) -> None:
        """Forget unreleased steps of earlier attempts (their nodes may be gone)."""
        for key in [k for k in self._values if k[0] < attempt]:
            del self._values[key]
