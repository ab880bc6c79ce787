"""``runs/<name>/events.jsonl``: one JSON object per line for every detection, eviction,
restart, join and fault, each with the evidence that led to it.

Several processes (the controller, every worker) append to the same file. Each event is
written with a single ``write`` on a file opened with ``O_APPEND``, so lines from different
processes never interleave on a local file system.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

EVENTS_NAME = "events.jsonl"


def events_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / EVENTS_NAME


class EventLog:
    """Appends events to ``<run_dir>/events.jsonl``; safe to use from several processes.

    ``context`` fields go into every event (a worker's launch id, so the controller of a
    later launch in the same run directory can tell its own workers' events from old ones)."""

    def __init__(
        self, run_dir: str | Path, *, source: str, context: Mapping[str, Any] | None = None
    ) -> None:
        self.path = events_path(run_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.source = source
        self.context = dict(context or {})

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one event line and return the object written."""
        record = {"t_unix_s": round(time.time(), 4), "event": event, "source": self.source}
        record.update(self.context)
        record.update(fields)
        line = (json.dumps(record, default=_jsonable, sort_keys=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        return record


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every event of ``run_dir`` in file order (skips a torn last line, if any)."""
    path = events_path(run_dir)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
