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


def store_parts(run_dir: str | Path) -> list[tuple[str, int]]:
    """(path, bytes) of every part of the store, sorted by path (empty if none yet).

    For readers that remember which parts they have seen: parts never change once renamed
    into place, so a path seen once need not be read again.
    """
    directory = store_path(run_dir)
    if not directory.is_dir():
        return []
    out = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.endswith(".parquet") and not entry.name.startswith("."):
                try:
                    out.append((entry.path, entry.stat().st_size))
                except FileNotFoundError:  # removed between the listing and the stat
                    continue
    return sorted(out)


def read_parts(paths: list[str], columns: list[str] | None = None) -> pa.Table:
    """Read ``paths`` (parts of one store) as one Arrow table of ``columns`` (default: all).

    The string columns stay dictionary-encoded (``node``, ``kind``, ``name`` repeat a handful
    of values over millions of rows): decoding them into Python strings would cost more than
    the rest of the read.
    """
    encoded = ("node", "kind", "name")
    fmt = pads.ParquetFileFormat(read_options=pads.ParquetReadOptions(dictionary_columns=encoded))
    schema = pa.schema(
        [
            pa.field(f.name, pa.dictionary(pa.int32(), pa.string())) if f.name in encoded else f
            for f in SCHEMA
        ]
    )
    return pads.dataset(paths, schema=schema, format=fmt).to_table(columns=columns)


def store_signature(run_dir: str | Path) -> int:
    """A cheap token that changes whenever a part is added: the store directory's mtime in ns
    (renaming a part into the directory updates it); 0 while there is no store."""
    try:
        return store_path(run_dir).stat().st_mtime_ns
    except FileNotFoundError:
        return 0


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
