"""The embedded telemetry store: ``runs/<name>/telemetry.parquet``, appended per window.

A Parquet file cannot be appended to once its footer is written, and several ranks (separate
processes, possibly restarted by TorchElastic) write at once. So ``telemetry.parquet`` is a
Parquet *dataset directory*: every window of every rank becomes one part file, written under a
hidden temporary name and renamed into place, so a live reader (the dashboard, the straggler
detector) never sees a half-written part. ``pyarrow`` reads the directory as one table.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from step_infra.telemetry.window import DETAIL_COLUMNS, Window

STORE_NAME = "telemetry.parquet"

SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("rank", pa.int32()),
        ("node", pa.string()),
        ("attempt", pa.int32()),
        ("kind", pa.string()),
        ("name", pa.string()),
        ("value", pa.float64()),
        ("t_unix_s", pa.float64()),
    ]
)
assert tuple(SCHEMA.names) == DETAIL_COLUMNS


def store_path(run_dir: str | Path) -> Path:
    """Where the store of ``run_dir`` lives."""
    return Path(run_dir) / STORE_NAME


class ParquetStore:
    """A :class:`~step_infra.telemetry.sink.MetricsSink` writing one part file per window."""

    def __init__(self, run_dir: str | Path, *, compression: str = "zstd") -> None:
        self._dir = store_path(run_dir)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._compression = compression
        self._prefix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._seq = 0
        self.rows_written = 0

    @property
    def path(self) -> Path:
        return self._dir

    def write_window(self, window: Window) -> None:
        table = pa.Table.from_pydict(window.detail, schema=SCHEMA)
        name = f"r{window.rank:05d}-{self._prefix}-{self._seq:06d}.parquet"
        self._seq += 1
        tmp = self._dir / f".{name}.tmp"
        pq.write_table(table, tmp, compression=self._compression)
        tmp.rename(self._dir / name)
        self.rows_written += table.num_rows

    def close(self) -> None:
        """Nothing stays open between windows."""


def read_store(run_dir: str | Path, *, min_mtime: float | None = None) -> pd.DataFrame:
    """Read every part of the store of ``run_dir`` as one DataFrame (empty if none yet).

    ``min_mtime`` keeps only parts written at or after that time (for incremental readers).
    """
    directory = store_path(run_dir)
    if not directory.is_dir():
        return SCHEMA.empty_table().to_pandas()
    files = sorted(
        str(p)
        for p in directory.glob("*.parquet")
        if min_mtime is None or p.stat().st_mtime >= min_mtime
    )
    if not files:
        return SCHEMA.empty_table().to_pandas()
    return pads.dataset(files, schema=SCHEMA, format="parquet").to_table().to_pandas()


class StoreTail:
    """Incremental reader: each :meth:`poll` returns only the parts not returned before."""

    def __init__(self, run_dir: str | Path) -> None:
        self._dir = store_path(run_dir)
        self._seen: set[str] = set()

    def poll(self) -> pd.DataFrame:
        if not self._dir.is_dir():
            return SCHEMA.empty_table().to_pandas()
        new = sorted(str(p) for p in self._dir.glob("*.parquet") if str(p) not in self._seen)
        if not new:
            return SCHEMA.empty_table().to_pandas()
        self._seen.update(new)
        return pads.dataset(new, schema=SCHEMA, format="parquet").to_table().to_pandas()
