"""What an elastic worker needs from the controller: identity, heartbeats, checkpoints.

The controller (:mod:`step_infra.telemetry.elastic`) passes everything through environment
variables, so any training script started by ``torchrun`` can use this module:

* ``STEP_INFRA_RUN_DIR``: the run directory (events, store, checkpoints, heartbeats);
* ``STEP_INFRA_NODE``: the node (agent) name, the unit the detector blames and evicts;
* ``STEP_INFRA_SLOW``: optional fault injection ``node:from_step:factor`` for tests/demos.

Heartbeats are small JSON files renamed into place (one per node), so the controller can tell
a hang from a long checkpoint save: a heartbeat carries the *phase* (``step``, ``save``,
``load``) and the controller applies that phase's timeout. Checkpoints are ``torch.save``
files written under a temporary name and renamed, with a ``latest`` pointer, so a worker
killed mid-save never leaves a torn checkpoint behind.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_DIR_ENV = "STEP_INFRA_RUN_DIR"
NODE_ENV = "STEP_INFRA_NODE"
SLOW_ENV = "STEP_INFRA_SLOW"


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerEnv:
    """Identity of one worker process, read from the environment the controller set."""

    run_dir: Path
    node: str
    rank: int
    world_size: int
    local_rank: int
    restart_count: int
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


def write_heartbeat(env: WorkerEnv, *, step: int, phase: str, generation: int) -> None:
    """Tell the controller this node is alive, at ``step``, in ``phase``."""
    directory = heartbeat_dir(env.run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "node": env.node,
        "rank": env.rank,
        "step": step,
        "phase": phase,
        "generation": generation,
        "pid": os.getpid(),  # lets an operator (or a fault injector) find the process
        "t_unix_s": time.time(),
    }
    _write_atomic(directory / f"{env.node}.r{env.local_rank}.json", json.dumps(payload).encode())


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


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any]) -> Path:
    """Write ``state`` for ``step`` atomically and point ``latest`` at it; keep the last 2."""
    import torch

    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step{step:08d}.pt"
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    _write_atomic(directory / "latest", path.name.encode())
    for old in sorted(directory.glob("step*.pt"))[:-2]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The state saved last, or None when the job has no checkpoint yet."""
    import torch

    pointer = checkpoint_dir(run_dir) / "latest"
    if not pointer.exists():
        return None
    state: dict[str, Any] = torch.load(
        checkpoint_dir(run_dir) / pointer.read_text().strip(), weights_only=False
    )
    return state
