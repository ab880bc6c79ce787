"""TorchElastic agents as the controller sees them: start one per node, stop one to evict.

The recipe verified on this machine (DESIGN.md): the controller hosts the c10d rendezvous
store (:func:`rendezvous_store`), agents join it with ``is_host=false`` and
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``. Each agent is a :class:`~step_infra.elastic.processes.Child`
in its own process group, so stopping it (SIGTERM, then SIGKILL after a grace period, the
same as every child a launcher owns) also stops its workers, and nothing else on the
machine is touched.

A *hung* node needs more: torchrun starts every worker in a session of its own, and a worker
that is stopped (SIGSTOP) keeps the SIGTERM the agent relays pending until it is continued. So
:func:`kill_agent` SIGKILLs the agent's group and then the workers by pid, each pid checked to
carry the launch's id in its environment (:func:`is_launch_process`) so that a recycled pid is
never hit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from step_infra.elastic.processes import Child, signal_group, spawn, stop
from step_infra.elastic.worker_env import LAUNCH_ENV


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentLaunch:
    """What every agent of one job gets on its ``torchrun`` command line."""

    nodes: int
    min_nodes: int
    nproc_per_node: int
    rdzv_port: int
    rdzv_id: str
    max_restarts: int
    worker_args: Sequence[str]
    rdzv_host: str = "127.0.0.1"
    # A stopped agent leaves the rendezvous only once its keep-alives are missed: the next
    # round waits about keep_alive_s x keep_alive_misses for it. Detection to first resumed
    # step in benchmarks/telemetry_elastic.py on this machine: torch's default 5 s x 3 took
    # 18.9 s, 1 s x 5 took 12.0 s, 1 s x 3 took 9.0 s (too few misses risks dropping a
    # live agent on a loaded host).
    keep_alive_s: float = 1.0
    # Once min_nodes have joined, a round waits this long for more (up to nodes).
    last_call_s: float = 1.0
    keep_alive_misses: int = 5

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={self.min_nodes}:{self.nodes}",
            f"--nproc-per-node={self.nproc_per_node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.rdzv_host}:{self.rdzv_port}",
            f"--local-addr={self.rdzv_host}",  # the workers' MASTER_ADDR: no hostname lookup
            f"--rdzv-id={self.rdzv_id}",
            "--rdzv-conf",
            f"is_host=false,join_timeout=600,last_call_timeout={self.last_call_s:g},"
            f"keep_alive_interval={self.keep_alive_s:g},keep_alive_max_attempt={self.keep_alive_misses}",
            f"--max-restarts={self.max_restarts}",
            "--monitor-interval=0.5",
            *self.worker_args,
        ]


@dataclass(slots=True)
class Agent:
    """One running ``torchrun`` agent (a node, or a hot spare waiting for a place)."""

    name: str
    child: Child
    spare: bool
    evicted: bool = False
    go_file: Path = Path()
    active: bool = False  # a spare that was activated (non-spares are always active)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.child.proc


def rendezvous_store(host: str = "127.0.0.1") -> Any:
    """A c10d ``TCPStore`` hosted by the caller on a free port (read it from ``.port``)."""
    import torch.distributed as dist

    return dist.TCPStore(
        host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
    )


def start_agent(
    name: str, launch: AgentLaunch, *, env: Mapping[str, str], log_dir: Path, spare: bool
) -> Agent:
    """Start the agent of node ``name``; its output goes to ``log_dir/<name>.log``.

    A spare starts on standby (:mod:`step_infra.elastic.standby`): torchrun loaded, outside
    the rendezvous until :func:`activate_spare`."""
    full_env = {**env, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    log_dir.mkdir(parents=True, exist_ok=True)
    command = launch.command()
    go = log_dir / f"{name}.go"
    go.unlink(missing_ok=True)
    if spare:  # python -m torch.distributed.run ARGS -> python -m ...standby --go F -- ARGS
        command = [
            command[0],
            "-m",
            "step_infra.elastic.standby",
            "--go",
            str(go),
            "--",
            *command[3:],
        ]
    child = spawn(name, command, env=full_env, log_dir=log_dir)
    return Agent(name=name, child=child, spare=spare, go_file=go)


def activate_spare(agent: Agent) -> None:
    """Let a standby spare's agent join the rendezvous."""
    agent.go_file.touch()
    agent.active = True


def stop_agent(agent: Agent, *, grace_s: float = 5.0) -> None:
    """Stop ``agent`` and its workers: SIGTERM to its process group, SIGKILL if it lingers."""
    if not agent.child.log_file.closed:
        stop([agent.child], grace_s=grace_s)


def is_launch_process(pid: int, launch: str) -> bool:
    """Whether ``pid`` is alive and was started with ``STEP_INFRA_LAUNCH=launch`` (Linux
    ``/proc``; elsewhere, or for another user's process, False: then nothing is killed)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{LAUNCH_ENV}={launch}".encode() in environ.split(b"\0")


def kill_workers(pids: Iterable[int], *, launch: str) -> list[int]:
    """SIGKILL the worker processes ``pids`` of ``launch`` (a stopped process ignores
    everything else); returns the pids that were killed."""
    killed = []
    for pid in sorted(set(pids)):
        if launch and is_launch_process(pid, launch):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def kill_agent(agent: Agent, *, worker_pids: Iterable[int], launch: str) -> list[int]:
    """Stop a hung node now: SIGKILL its agent's process group (so it restarts nothing), then
    its workers by pid; returns the worker pids killed."""
    if agent.proc.poll() is None:
        signal_group(agent.child, signal.SIGKILL)
        agent.proc.wait(timeout=10)
    return kill_workers(worker_pids, launch=launch)
