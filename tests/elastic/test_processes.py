"""The supervisor every launcher shares: children in their own group, stopped as a group."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from step_infra.elastic.processes import Supervisor

# A child that starts a grandchild (as an agent starts workers), prints its pid, then waits.
PARENT = (
    "import subprocess, sys, time; "
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    "print(g.pid, flush=True); time.sleep(60)"
)


def _grandchild_pid(log: Path, timeout_s: float = 20.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text().strip() if log.exists() else ""
        if text:
            return int(text.splitlines()[0])
        time.sleep(0.05)
    raise AssertionError(f"no pid in {log} after {timeout_s} s")


def test_stop_all_stops_the_whole_group_and_check_names_the_dead_child(
    tmp_path: Path, pid_alive: Callable[[int], bool]
) -> None:
    sup = Supervisor(tmp_path / "logs", {"STEP_TEST": "1"})
    parent = sup.start("parent", [sys.executable, "-c", PARENT])
    quitter = sup.start("quitter", [sys.executable, "-c", "import sys; sys.exit(3)"])
    grandchild = _grandchild_pid(parent.log_path)
    quitter.proc.wait(timeout=20)
    with pytest.raises(RuntimeError, match=r"quitter exited with 3; see .*quitter\.log"):
        sup.check()
    assert os.getpgid(parent.pid) == parent.pid  # a session (and group) of its own
    sup.stop_all(grace_s=5.0)
    assert parent.proc.returncode is not None and not sup.children
    deadline = time.monotonic() + 10
    while pid_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(grandchild), "the grandchild outlived its group's stop"
