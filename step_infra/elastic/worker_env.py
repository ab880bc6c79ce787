"""What an elastic worker needs from the controller: its identity and heartbeats.

The controller (:mod:`step_infra.elastic.controller`) passes everything through environment
variables, so any training script started by ``torchrun`` can use this module:

* ``STEP_INFRA_RUN_DIR``: the run directory (events, store, checkpoints, heartbeats);
* ``STEP_INFRA_NODE``: the node (agent) name, the unit the detector blames and evicts;
* ``STEP_INFRA_LAUNCH``: the id of the controller's launch; heartbeats and events carry it so
  a controller never judges liveness, membership or progress from an earlier launch's files;
* ``STEP_INFRA_SLOW``: optional fault injection ``node:from_step:factor`` for tests/demos.

Heartbeats are small JSON files renamed into place (one per node), so the controller can tell
a hang from a long checkpoint save: a heartbeat carries the *phase* (``step``, ``save``,
``load``, ``collective``) and the controller applies that phase's timeout. A :class:`Heartbeat`
also *pulses* from a thread: a rank frozen in place (SIGSTOP, a dead host) stops pulsing, while
ranks waiting for it at a collective keep pulsing; so a hang names its rank. Checkpoints
are :mod:`step_infra.elastic.checkpoint`'s (torch.distributed.checkpoint, one format for
every job).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_DIR_ENV = "STEP_INFRA_RUN_DIR"
NODE_ENV = "STEP_INFRA_NODE"
SLOW_ENV = "STEP_INFRA_SLOW"
LAUNCH_ENV = "STEP_INFRA_LAUNCH"
PULSE_S = 1.0  # a Heartbeat's liveness pulse: the controller calls a rank frozen after 3 missed


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerEnv:
    """Identity of one worker process, read from the environment the controller set."""

    run_dir: Path
    node: str
    rank: int
    world_size: int
    local_rank: int
    restart_count: int
    launch: str = ""  # the controller's launch id ("" outside a controller)
    slow_from_step: int | None = None
    slow_factor: float = 1.0

    @classmethod
    def from_env(cls) -> WorkerEnv:
        env = os.environ
        if RUN_DIR_ENV not in env:
            raise ValueError(f"{RUN_DIR_ENV} is not set: start workers through run_elastic_job")
        node = env.get(NODE_ENV, "node0")
        slow_from, factor = None, 1.0
        spec = env.get(SLOW_ENV, "")
        if spec:
            try:
                slow_node, start, fac = spec.split(":")
                if slow_node == node:
                    slow_from, factor = int(start), float(fac)
            except ValueError as exc:
                raise ValueError(
                    f"{SLOW_ENV}={spec!r}: expected 'node:from_step:factor', e.g. 'node1:20:1.3'"
                ) from exc
        return cls(
            run_dir=Path(env[RUN_DIR_ENV]),
            node=node,
            rank=int(env.get("RANK", 0)),
            world_size=int(env.get("WORLD_SIZE", 1)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
            launch=env.get(LAUNCH_ENV, ""),
            slow_from_step=slow_from,
            slow_factor=factor,
        )

    def slowdown(self, step: int) -> float:
        """Factor by which this node's compute is stretched at ``step`` (1.0 when healthy)."""
        if self.slow_from_step is not None and step >= self.slow_from_step:
            return self.slow_factor
        return 1.0


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def heartbeat_dir(run_dir: Path) -> Path:
    return run_dir / "heartbeat"


def heartbeat_payload(env: WorkerEnv, *, step: int, phase: str, generation: int) -> dict[str, Any]:
    """One heartbeat: ``t_unix_s`` is when the rank last made progress (reached ``step`` in
    ``phase``), ``alive_unix_s`` when it last showed it was running at all."""
    now = time.time()
    return {
        "node": env.node,
        "rank": env.rank,
        "step": step,
        "phase": phase,
        "generation": generation,
        "launch": env.launch,
        "pid": os.getpid(),  # lets an operator (or a fault injector) find the process
        "t_unix_s": now,
        "alive_unix_s": now,
    }


def _heartbeat_path(env: WorkerEnv) -> Path:
    return heartbeat_dir(env.run_dir) / f"{env.node}.r{env.local_rank}.json"


def write_heartbeat(env: WorkerEnv, *, step: int, phase: str, generation: int) -> None:
    """Tell the controller this node is alive, at ``step``, in ``phase`` (no pulse: prefer a
    :class:`Heartbeat`, which lets the controller tell a frozen rank from a waiting one)."""
    payload = heartbeat_payload(env, step=step, phase=phase, generation=generation)
    _heartbeat_path(env).parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(_heartbeat_path(env), json.dumps(payload).encode())


class Heartbeat:
    """This rank's heartbeat file: progress from :meth:`beat`, liveness from a pulse thread.

    The pulse rewrites the last progress with a fresh ``alive_unix_s`` every ``pulse_s``. A
    rank blocked in a collective (the GIL released) keeps pulsing; one that is stopped,
    killed or wedged with the GIL held does not. Writes are serialized by a lock because both
    threads rename the same temporary file into place."""

    def __init__(self, env: WorkerEnv, *, generation: int, pulse_s: float = PULSE_S) -> None:
        if pulse_s <= 0:
            raise ValueError(f"pulse_s={pulse_s}: expected > 0 seconds")
        self.env, self.generation, self.pulse_s = env, generation, pulse_s
        self._path = _heartbeat_path(env)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._payload: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pulse, daemon=True, name="heartbeat-pulse")
        self._thread.start()

    def beat(self, *, step: int, phase: str) -> None:
        """Record progress: this rank reached ``step`` in ``phase``."""
        payload = heartbeat_payload(self.env, step=step, phase=phase, generation=self.generation)
        with self._lock:
            self._payload = payload
            _write_atomic(self._path, json.dumps(payload).encode())

    def close(self) -> None:
        """Stop pulsing (the job is done: a stale pulse then means nothing)."""
        self._stop.set()
        self._thread.join(timeout=2 * self.pulse_s)

    def _pulse(self) -> None:
        while not self._stop.wait(self.pulse_s):
            with self._lock:
                if self._payload is None:
                    continue
                self._payload["alive_unix_s"] = time.time()
                try:
                    _write_atomic(self._path, json.dumps(self._payload).encode())
                except OSError:  # a full or vanished disk must not kill training
                    continue


def read_heartbeats(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in heartbeat_dir(run_dir).glob("*.json"):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def next_generation(run_dir: Path) -> int:
    """Bump and return the job-wide generation counter (call on global rank 0 only)."""
    path = run_dir / "generation"
    current = int(path.read_text()) if path.exists() else 0
    _write_atomic(path, str(current + 1).encode())
    return current + 1
