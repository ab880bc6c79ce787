"""Child processes a controller owns: started in their own session, stopped as a group.

The elastic controller (its torchrun agents) and the training job's launcher (registry,
encoder servers) start children the same way and must stop them the same way, whatever
happens, Ctrl-C included, so that no process outlives the job and nothing else on the
machine is touched:

* each child runs in a new session (its own process group), so stopping it also stops what
  it started (an agent's workers);
* stopping sends SIGTERM to that group, waits ``grace_s``, then SIGKILLs the group;
* output goes to ``<log_dir>/<name>.log`` (appended: a resumed job keeps the history).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO


@dataclass(slots=True)
class Child:
    """One running child process and its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_file: IO[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


def spawn(name: str, command: Sequence[str], *, env: Mapping[str, str], log_dir: Path) -> Child:
    """Start ``command`` (with ``env`` over this process's environment) as child ``name``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = log_path.open("ab")
    proc = subprocess.Popen(
        list(command),
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopping it stops its children
    )
    return Child(name=name, proc=proc, log_file=log_file, log_path=log_path)


def signal_group(child: Child, sig: signal.Signals) -> None:
    """Send ``sig`` to the child's process group (nothing if it is gone)."""
    if child.alive():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.proc.pid, sig)


def stop(children: Sequence[Child], *, grace_s: float = 5.0) -> None:
    """Stop ``children`` (in the order given): SIGTERM to every group at once, then SIGKILL
    the groups still alive after ``grace_s``; close their logs."""
    for c in children:
        signal_group(c, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for c in children:
        try:
            c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_group(c, signal.SIGKILL)
            c.proc.wait(timeout=10)
        c.log_file.close()


class Supervisor:
    """The children one owner started; :meth:`stop_all` stops them in reverse order."""

    def __init__(self, log_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.env = dict(env or {})
        self.children: list[Child] = []

    def start(self, name: str, command: Sequence[str]) -> Child:
        child = spawn(name, command, env=self.env, log_dir=self.log_dir)
        self.children.append(child)
        return child

    def check(self) -> None:
        """Raise ``RuntimeError`` naming the first child that exited, and its log."""
        for c in self.children:
            code = c.proc.poll()
            if code is not None:
                raise RuntimeError(f"{c.name} exited with {code}; see {c.log_path}")

    def stop_all(self, grace_s: float = 10.0) -> None:
        stop(list(reversed(self.children)), grace_s=grace_s)
        self.children.clear()
