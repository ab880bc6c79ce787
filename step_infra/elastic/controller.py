"""The elastic controller: run a job under TorchElastic, evict stragglers, admit hot spares.

Recipe (DESIGN.md, "Verified on this machine"): the controller process hosts the c10d
rendezvous ``TCPStore`` itself, because if an agent hosted it, evicting that agent would kill
the job. Every node is one ``torchrun`` agent started with ``--rdzv-conf is_host=false`` and
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (without it the second rendezvous round hangs on
``MASTER_ADDR``). ``nodes + spares`` agents start for ``--nnodes=min_nodes:nodes``; the
extra ones wait in the rendezvous. Evicting a node stops its agent (the whole process group); the
survivors' workers fail their next collective, their agents restart them, and a waiting
spare takes the free place. Workers resume from the latest checkpoint and keep the global
batch by recomputing gradient accumulation. A spare that never got a place would crash when
the job ends, so the controller stops spares itself.

Spares wait on *standby* (:mod:`~step_infra.elastic.standby`: torchrun loaded, outside the
rendezvous) and the controller activates one right after an eviction. Waiting inside the
rendezvous would break crash recovery: a worker that crashes sends every agent back to the
rendezvous with the spare there too, and torch 2.13 then restarts the workers over and over.

The loop here watches (a) the telemetry store, feeding per-rank compute times to the
:class:`StragglerDetector` and pricing each detection (:mod:`~step_infra.elastic.watch`:
an eviction happens only when it saves more than it costs), (b) heartbeats, with a
separate timeout for checkpoint phases so a long save is not taken for a hang, and (c) the
events workers write (starts, resumes), and it writes every detection, eviction, restart and
join to ``events.jsonl``.

Every launch gets an id of its own (``STEP_INFRA_LAUNCH``, in every worker's heartbeats and
events) and reads only the events appended after its start: a run directory resumed after a
Ctrl-C still holds the interrupted launch's heartbeats and events, and judging liveness,
membership or progress from them declared the resumed job hung before its workers started.

A hang is recovered, not fatal: the heartbeats name the rank (a frozen one stops its liveness
pulse; a stuck but live one lags the ranks that wait for it at the collective), the controller
SIGKILLs it and either puts a standby spare in its node's place (as an eviction does) or lets
TorchElastic restart every worker from the last checkpoint. The job fails only once more than
``restarts_without_progress`` restarts in a row brought no new step.
"""

from __future__ import annotations

import logging
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from step_infra.elastic.agents import (
    Agent,
    AgentLaunch,
    activate_spare,
    kill_agent,
    kill_workers,
    rendezvous_store,
    start_agent,
    stop_agent,
)
from step_infra.elastic.policy import EvictionPolicy, make_policy
from step_infra.elastic.watch import StragglerWatch, WatchState
from step_infra.elastic.worker_env import (
    LAUNCH_ENV,
    NODE_ENV,
    PULSE_S,
    RUN_DIR_ENV,
    SLOW_ENV,
    read_heartbeats,
)
from step_infra.telemetry.detector import DetectorConfig
from step_infra.telemetry.events import EventLog, read_events
from step_infra.telemetry.store import StoreTail

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ElasticConfig:
    """One elastic job: how many nodes, spares, what each runs, and the timeouts."""

    run_dir: Path
    worker_args: tuple[str, ...] = ()  # after ``python``: "-m module ..." or "script"
    nodes: int = 3
    min_nodes: int | None = None  # None: = nodes. Below nodes, an eviction without a spare
    # shrinks the job (gradient accumulation grows to keep the global batch).
    spares: int = 1
    nproc_per_node: int = 1
    # Address the rendezvous store binds and the agents' workers use (torchrun --local-addr):
    # loopback on one host, this host's routable address when other hosts join.
    host: str = "127.0.0.1"
    policy: str = "evict"  # "evict" or "detect"
    max_evictions: int = 1
    detector: DetectorConfig = field(
        default_factory=lambda: DetectorConfig(
            # A handful of ranks on a shared host: floor their spread at 2 %.
            warmup_steps=5,
            window_steps=3,
            persist_k=3,
            persist_n=4,
            mad_floor=0.02,
        )
    )
    section: str = "compute"  # the compute-only section the detector compares
    signal: str = "compute"  # or "arrival": step time less the waits at collectives
    steps_total: int | None = None  # the job's length, for the cost of an eviction
    # Seconds an eviction costs before the job is back at work; None: the time this launch
    # took to its first step until a restart is measured (then that restart's time).
    restart_cost_s: float | None = None
    eviction_margin: float = 1.0  # evict when saving > margin x cost
    # Serve the controller's metrics (step_infra_straggler_score per rank) for Prometheus on
    # 127.0.0.1:metrics_port (0: a free port, logged in job_start); None: not exported.
    metrics_port: int | None = None
    agent_max_restarts: int = 5  # torchrun --max-restarts
    rdzv_keep_alive_s: float = 1.0  # an evicted agent is dropped from the rendezvous after
    rdzv_keep_alive_misses: int = 5  # ... this many missed keep-alives
    # With min_nodes < nodes a round closes this long after min_nodes joined: long enough
    # for agents started together to all make the first round.
    rdzv_last_call_s: float = 5.0
    restarts_without_progress: int = 3  # give up after this many restarts with no new step
    step_timeout_s: float = 60.0  # no heartbeat in a "step" phase for this long: a hang
    checkpoint_timeout_s: float = 300.0  # ... in a "save"/"load" phase
    startup_timeout_s: float = 180.0  # agents + first step
    job_timeout_s: float = 900.0
    poll_interval_s: float = 0.5
    slow: str | None = None  # fault injection "node:from_step:factor" (tests, demos)
    extra_env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.spares < 0 or self.nproc_per_node < 1:
            raise ValueError(
                f"need nodes >= 1, spares >= 0, nproc_per_node >= 1; got nodes={self.nodes}, "
                f"spares={self.spares}, nproc_per_node={self.nproc_per_node}"
            )
        make_policy(self.policy)  # validates the name
        if self.min_nodes is not None and not 1 <= self.min_nodes <= self.nodes:
            raise ValueError(
                f"min_nodes must be between 1 and nodes={self.nodes}, got {self.min_nodes}"
            )

    @property
    def min_size(self) -> int:
        return self.nodes if self.min_nodes is None else self.min_nodes


@dataclass(slots=True, kw_only=True)
class ElasticResult:
    """What happened: the outcome and the timings an SRE asks about."""

    ok: bool
    reason: str
    evicted: list[str] = field(default_factory=list)
    joined: list[str] = field(default_factory=list)
    restarts: int = 0
    last_step: int = -1
    detection_to_resume_s: float | None = None
    wall_s: float = 0.0


class ElasticController:
    """Owns the rendezvous store and the agents of one job; :meth:`run` drives it."""

    def __init__(self, config: ElasticConfig, policy: EvictionPolicy | None = None) -> None:
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.policy = policy or make_policy(
            config.policy,
            max_evictions=config.max_evictions,
            require_spare=config.min_size == config.nodes,
            margin=config.eviction_margin,
        )
        # This launch's id: only heartbeats and events that carry it are this job's.
        self.launch = uuid.uuid4().hex[:12]
        self.events = EventLog(self.run_dir, source="controller", context={"launch": self.launch})
        self.watch = StragglerWatch(
            config.detector,
            self.policy,
            self.events,
            section=config.section,
            signal=config.signal,
            steps_total=config.steps_total,
            restart_s=config.restart_cost_s or 30.0,
        )
        self._last_durable_step = -1
        self.tail = StoreTail(self.run_dir)
        self.agents: dict[str, Agent] = {}
        self._store: Any = None
        self._events_seen = 0
        self._generation = 0
        self._members: dict[str, int] = {}  # node -> generation it last started in
        self._last_step = -1
        self._progress_at_restart = -1
        self._restarts_without_progress = 0
        self._detected_at: float | None = None
        self._restarting_since: float | None = None  # eviction done, new generation not yet
        self._hang_at: float | None = None  # a hang was recovered, its first step not yet seen
        self._hang_generation = 0  # the generation that hung
        self._last_hang: str | None = None  # what the last hang was, for the failure reason
        self.result = ElasticResult(ok=False, reason="not run")

    # --------------------------------------------------------------- agents
    def _start_agent(self, name: str, port: int, *, spare: bool) -> None:
        c = self.config
        launch = AgentLaunch(
            nodes=c.nodes,
            min_nodes=c.min_size,
            nproc_per_node=c.nproc_per_node,
            rdzv_port=port,
            rdzv_host=c.host,
            rdzv_id=self.run_dir.name,
            max_restarts=c.agent_max_restarts,
            worker_args=c.worker_args,
            keep_alive_s=c.rdzv_keep_alive_s,
            keep_alive_misses=c.rdzv_keep_alive_misses,
            last_call_s=c.rdzv_last_call_s if c.min_size < c.nodes else 1.0,
        )
        env = dict(c.extra_env)
        env.update(
            {RUN_DIR_ENV: str(self.run_dir.resolve()), NODE_ENV: name, LAUNCH_ENV: self.launch}
        )
        if c.slow:
            env[SLOW_ENV] = c.slow
        agent = start_agent(name, launch, env=env, log_dir=self.run_dir / "logs", spare=spare)
        self.agents[name] = agent
        self.events.emit("agent_start", node=name, pid=agent.proc.pid, spare=spare)

    # ----------------------------------------------------------------- loop
    def run(self) -> ElasticResult:
        c = self.config
        t_start = time.monotonic()
        self._store = rendezvous_store(self.config.host)
        port = int(self._store.port)
        metrics = self._start_metrics()
        # Events already in the file are an earlier launch's (a resume after Ctrl-C): skip them.
        self._events_seen = len(read_events(self.run_dir))
        self.events.emit(
            "job_start",
            nodes=c.nodes,
            spares=c.spares,
            policy=self.policy.name,
            rdzv_port=port,
            detector={k: getattr(c.detector, k) for k in type(c.detector).__slots__},
            metrics_port=None if metrics is None else metrics.prometheus_port,
        )
        try:
            for i in range(c.nodes):
                self._start_agent(f"node{i}", port, spare=False)
            self._wait_first_step(t_start)
            if c.restart_cost_s is None:  # until a restart is measured, price one as a start
                self.watch.restart_s = round(time.monotonic() - t_start, 2)
            for i in range(c.spares):  # spares start once the job formed: they wait
                self._start_agent(f"spare{i}", port, spare=True)
            self.result = self._loop(t_start)
        except _JobError as exc:  # keep what happened before the failure: it explains it
            self.result = ElasticResult(
                ok=False,
                reason=str(exc),
                evicted=self.result.evicted,
                restarts=self.result.restarts,
                last_step=self._last_step,
                detection_to_resume_s=self.result.detection_to_resume_s,
            )
        finally:
            for agent in self.agents.values():
                stop_agent(agent)
            self._kill_leftover_workers()
            self.result.wall_s = round(time.monotonic() - t_start, 2)
            self.events.emit(
                "job_end",
                ok=self.result.ok,
                reason=self.result.reason,
                evicted=self.result.evicted,
                joined=self.result.joined,
                restarts=self.result.restarts,
                last_step=self.result.last_step,
                detection_to_resume_s=self.result.detection_to_resume_s,
                wall_s=self.result.wall_s,
            )
            self._store = None
            if metrics is not None:
                metrics.shutdown()
        return self.result

    def _start_metrics(self) -> Any:
        """The controller's own Prometheus endpoint with the straggler-score gauge."""
        if self.config.metrics_port is None:
            return None
        from step_infra.telemetry.otel import OTelConfig, StragglerScores, make_meter_provider

        world = (self.config.nodes + self.config.spares) * self.config.nproc_per_node
        provider = make_meter_provider(
            OTelConfig(prometheus_port=self.config.metrics_port, cardinality_limit=world + 1),
            rank=-1,
            node="controller",
            run=self.run_dir.name,
        )
        self.watch.scores = StragglerScores(provider.provider)
        return provider

    def _wait_first_step(self, t_start: float) -> None:
        while time.monotonic() - t_start < self.config.startup_timeout_s:
            self._poll_events()
            if self._last_step >= 0:
                return
            dead = [a for a in self.agents.values() if a.proc.poll() not in (None, 0)]
            if dead:
                raise _JobError(f"agent {dead[0].name} exited with {dead[0].proc.returncode}")
            time.sleep(self.config.poll_interval_s)
        raise _JobError(
            f"no training step within startup_timeout_s={self.config.startup_timeout_s}"
        )

    def _active(self) -> list[str]:
        """Nodes in the current generation's membership."""
        return [n for n, g in self._members.items() if g == self._generation]

    def _loop(self, t_start: float) -> ElasticResult:
        c = self.config
        evicted: list[str] = []
        joined: list[str] = []
        while True:
            if time.monotonic() - t_start > c.job_timeout_s:
                raise _JobError(f"job_timeout_s={c.job_timeout_s} exceeded")
            new_events = self._poll_events()
            for ev in new_events:
                node = ev.get("node")
                if (
                    ev["event"] == "worker_start"
                    and node in self.agents
                    and self.agents[node].spare
                    and node not in joined
                ):
                    joined.append(node)
                    self.events.emit(
                        "join",
                        node=node,
                        generation=ev["generation"],
                        resume_step=ev["resume_step"],
                        world_size=ev["world_size"],
                        grad_accum=ev["grad_accum"],
                    )
                if (
                    ev["event"] == "resumed"
                    and self._detected_at is not None
                    and self.result.detection_to_resume_s is None
                ):
                    self.result.detection_to_resume_s = round(time.time() - self._detected_at, 2)
                    if c.restart_cost_s is None:
                        self.watch.restart_s = self.result.detection_to_resume_s
                    self.events.emit(
                        "recovered",
                        step=ev["step"],
                        loss=ev["loss"],
                        detection_to_resume_s=self.result.detection_to_resume_s,
                    )
            if self._check_done(new_events):
                return ElasticResult(
                    ok=True,
                    reason="completed",
                    evicted=evicted,
                    joined=joined,
                    restarts=self.result.restarts,
                    last_step=self._last_step,
                    detection_to_resume_s=self.result.detection_to_resume_s,
                )
            self._check_agents()
            self._check_heartbeats(evicted)
            state = WatchState(
                generation=self._generation,
                active_nodes=self._active(),
                last_durable_step=self._last_durable_step,
                spares_left=len(self._standby()),
            )
            for decision in self.watch.poll(self.tail.poll(), state):
                self._detected_at = self._detected_at or time.time()
                self._evict(decision.node, decision.reason, decision.detection.evidence)
                evicted.append(decision.node)
            self.result.evicted = evicted
            time.sleep(c.poll_interval_s)

    def _evict(self, node: str, reason: str, evidence: dict[str, Any]) -> None:
        agent = self.agents.get(node)
        if agent is None or agent.evicted:
            return
        agent.evicted = True
        self.events.emit(
            "eviction", node=node, reason=reason, evidence=evidence, last_step=self._last_step
        )
        stop_agent(agent)
        self._members.pop(node, None)
        self._restarting_since = time.time()
        standby = self._standby()
        if standby:  # the freed place goes to a spare
            activate_spare(standby[0])
            self.events.emit("spare_activated", node=standby[0].name, replaces=node)

    def _standby(self) -> list[Agent]:
        """Spares still on standby (alive, not yet activated)."""
        return [
            a for a in self.agents.values() if a.spare and not a.active and a.proc.poll() is None
        ]

    def _poll_events(self) -> list[dict[str, Any]]:
        """This launch's worker events appended since the last poll, applied to membership,
        generation and progress. Another launch's events (an interrupted run's, or a worker
        of it still alive) are skipped: they would lend this job their generation, members
        and steps."""
        events = read_events(self.run_dir)
        new = [
            ev
            for ev in events[self._events_seen :]
            if ev.get("launch") == self.launch and ev.get("source") != "controller"
        ]
        self._events_seen = len(events)
        for ev in new:
            kind = ev["event"]
            if kind == "worker_start":
                gen = int(ev["generation"])
                if gen > self._generation:
                    if self._generation > 0:
                        self.result.restarts += 1
                        if self._last_step <= self._progress_at_restart:
                            self._restarts_without_progress += 1
                        else:
                            self._restarts_without_progress = 0
                        self._progress_at_restart = self._last_step
                        self.events.emit(
                            "restart",
                            generation=gen,
                            resume_step=ev["resume_step"],
                            world_size=ev["world_size"],
                            grad_accum=ev["grad_accum"],
                            restarts_without_progress=self._restarts_without_progress,
                        )
                        self.watch.restart(gen)
                    self._generation = gen
                    self._restarting_since = None
                self._members[str(ev["node"])] = gen
            if kind in ("checkpoint", "resumed", "worker_done"):
                self._last_step = max(self._last_step, int(ev.get("step", -1)))
            if kind == "checkpoint" and ev.get("durable", True):
                self._last_durable_step = max(self._last_durable_step, int(ev.get("step", -1)))
        limit = self.config.restarts_without_progress
        if self._restarts_without_progress > limit:
            after_hang = self._hang_at is not None and self._last_hang  # not recovered since
            why = f"; the last one followed a hang: {self._last_hang}" if after_hang else ""
            raise _JobError(
                f"{self._restarts_without_progress} restarts without progress (> {limit}), "
                f"none got past step {self._last_step}{why}"
            )
        return new

    def _check_done(self, new_events: list[dict[str, Any]]) -> bool:
        if not any(ev["event"] == "worker_done" for ev in new_events):
            return False
        deadline = time.monotonic() + 30.0
        training = [a for a in self.agents.values() if a.name in self._active()]
        for agent in training:
            try:
                agent.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise _JobError(f"agent {agent.name} did not exit after the job finished") from None
        return True

    def _check_agents(self) -> None:
        for agent in self.agents.values():
            code = agent.proc.poll()
            if code not in (None, 0) and not agent.evicted and agent.name in self._active():
                raise _JobError(f"agent {agent.name} exited with {code} (max restarts reached?)")

    def _check_heartbeats(self, evicted: list[str]) -> None:
        now = time.time()
        if self._restarting_since is not None:
            # Between an eviction and the new generation's first start the survivors are
            # silent by design: only the startup budget applies.
            if now - self._restarting_since > self.config.startup_timeout_s:
                self.events.emit(
                    "hang",
                    phase="restart",
                    silent_s=round(now - self._restarting_since, 1),
                    timeout_s=self.config.startup_timeout_s,
                )
                raise _JobError(
                    f"no restart within startup_timeout_s={self.config.startup_timeout_s}"
                )
            return
        beats = self._current_beats()
        if not beats:
            return
        for hb in beats:
            self._last_step = max(self._last_step, completed_step(hb))
        self._note_hang_recovered(beats)
        # Synchronous data parallelism: one stuck rank stalls every other rank at its next
        # collective, so the job is hung when even the *newest* heartbeat is too old. While a
        # rank saves or loads a checkpoint the others wait for it: the checkpoint timeout
        # applies to the whole job then, not only to the saving rank.
        newest = max(beats, key=lambda hb: float(hb["t_unix_s"]))
        in_checkpoint = any(hb.get("phase") in ("save", "load") for hb in beats)
        limit = self.config.checkpoint_timeout_s if in_checkpoint else self.config.step_timeout_s
        silent = now - float(newest["t_unix_s"])
        if silent <= limit:
            return
        phase = "checkpoint" if in_checkpoint else "step"
        hung, how = hung_ranks(beats, now=now, frozen_after_s=max(limit / 2, 3 * PULSE_S))
        nodes = sorted({str(hb["node"]) for hb in hung})
        spare = self._standby()[0].name if len(nodes) == 1 and self._standby() else None
        action = (
            f"evict {nodes[0]}, {spare} takes its place"
            if spare
            else "restart every worker from the last checkpoint"
        )
        who = ", ".join(rank_name(hb) for hb in hung) or "no single rank"
        self._last_hang = (
            f"job silent for {silent:.0f} s > {limit} s in phase {phase!r} after step "
            f"{self._last_step}; hung: {who} ({how})"
        )
        evidence = {
            "how": how,
            "heartbeats": {
                rank_name(hb): {
                    "step": hb["step"],
                    "phase": hb.get("phase"),
                    "age_s": round(now - float(hb["t_unix_s"]), 1),
                    "pulse_age_s": round(now - _alive_unix_s(hb), 1),
                    "pid": hb.get("pid"),
                }
                for hb in beats
            },
        }
        self.events.emit(
            "hang",
            phase=phase,
            silent_s=round(silent, 1),
            timeout_s=limit,
            step=self._last_step,
            generation=self._generation,
            node=nodes[0] if len(nodes) == 1 else None,
            ranks=[rank_name(hb) for hb in hung],
            action=action,
            evidence=evidence,
        )
        self._recover_from_hang(beats, hung, evict_node=nodes[0] if spare else None)
        if spare:
            self._evict(nodes[0], f"hang: {self._last_hang}", evidence)
            evicted.append(nodes[0])

    def _current_beats(self) -> list[dict[str, Any]]:
        """Heartbeats of this launch's current generation from its active nodes; files that
        an earlier launch or generation left behind say nothing about this one."""
        active = set(self._active())
        return [
            hb
            for hb in read_heartbeats(self.run_dir)
            if hb.get("launch") == self.launch
            and hb.get("generation") == self._generation
            and str(hb.get("node")) in active
        ]

    def _recover_from_hang(
        self,
        beats: Sequence[Mapping[str, Any]],
        hung: Sequence[Mapping[str, Any]],
        *,
        evict_node: str | None,
    ) -> None:
        """Kill what hangs. With ``evict_node`` (a spare will take its place) that node's
        agent and workers go (the caller then evicts it); otherwise SIGKILL the hung workers (every worker, when no rank could be
        blamed) and TorchElastic restarts all of them from the last checkpoint: the other
        ranks fail the collective they wait in, and the agents form a new generation."""
        self._hang_at = time.time()
        self._hang_generation = self._generation
        if evict_node is not None:
            pids = [int(hb["pid"]) for hb in beats if hb.get("node") == evict_node and "pid" in hb]
            kill_agent(self.agents[evict_node], worker_pids=pids, launch=self.launch)
            return
        pids = [int(hb["pid"]) for hb in (hung or beats) if "pid" in hb]
        killed = kill_workers(pids, launch=self.launch)
        if not killed:
            raise _JobError(
                f"{self._last_hang}; could not stop the hung workers (pids {pids} are gone or "
                "not this launch's), so no restart can follow"
            )
        self._restarting_since = time.time()

    def _note_hang_recovered(self, beats: list[dict[str, Any]]) -> None:
        """After a hang, the first step a newer generation completes is the recovery."""
        if self._hang_at is None or self._generation <= self._hang_generation:
            return
        done = [completed_step(hb) for hb in beats if hb.get("phase") == "step"]
        if not done:
            return
        self.events.emit(
            "recovered",
            cause="hang",
            step=max(done),
            generation=self._generation,
            hang_to_resume_s=round(time.time() - self._hang_at, 2),
        )
        self._hang_at = None

    def _kill_leftover_workers(self) -> None:
        """No worker of this launch may outlive the job: one that is frozen (SIGSTOP) keeps
        the SIGTERM its agent relayed pending, and torchrun started it in its own session."""
        pids = [
            int(hb["pid"])
            for hb in read_heartbeats(self.run_dir)
            if hb.get("launch") == self.launch and "pid" in hb
        ]
        killed = kill_workers(pids, launch=self.launch)
        if killed:
            log.warning("killed workers that outlived their agents: %s", killed)
            self.events.emit("workers_killed", pids=killed)


class _JobError(RuntimeError):
    pass


# Order of the phases a rank passes within one step number: the gradient collective of step
# s comes before its "step" heartbeat (s done), and a save of s after it.
_PHASE_ORDER = {"load": 0, "collective": 1, "step": 2, "save": 3}


def completed_step(hb: Mapping[str, Any]) -> int:
    """The last step a heartbeat's rank finished (at the collective of s: s - 1)."""
    step = int(hb.get("step", -1))
    return step - 1 if hb.get("phase") == "collective" else step


def rank_name(hb: Mapping[str, Any]) -> str:
    return f"{hb.get('node')}/r{hb.get('rank')}"


def _alive_unix_s(hb: Mapping[str, Any]) -> float:
    """When the rank last pulsed (a heartbeat written without a pulse: its progress time)."""
    return float(hb.get("alive_unix_s", hb["t_unix_s"]))


def hung_ranks(
    beats: Sequence[Mapping[str, Any]], *, now: float, frozen_after_s: float
) -> tuple[list[Mapping[str, Any]], str]:
    """The ranks a hang is on, and how they were told from the ranks waiting for them.

    "frozen": the rank stopped pulsing (SIGSTOP, killed host, the GIL held) while the others,
    blocked in a collective, still pulse. "behind": every rank pulses, but these are at an
    earlier step or phase than the rest, who wait for them at the collective. "unknown": all
    at the same point (or all frozen): nobody to blame, and every rank must restart.
    """
    frozen = [hb for hb in beats if now - _alive_unix_s(hb) > frozen_after_s]
    if frozen and len(frozen) < len(beats):
        return frozen, "frozen"

    def progress(hb: Mapping[str, Any]) -> tuple[int, int]:
        return int(hb.get("step", -1)), _PHASE_ORDER.get(str(hb.get("phase")), 2)

    lead = max(progress(hb) for hb in beats)
    behind = [hb for hb in beats if progress(hb) < lead]
    if behind:
        return behind, "behind"
    return [], "unknown"


def run_elastic_job(config: ElasticConfig, policy: EvictionPolicy | None = None) -> ElasticResult:
    """Run one elastic job to completion (or failure). Blocks; returns what happened.
    ``step-infra train`` runs its trainers through :class:`ElasticController` the same way
    (``--eviction evict|detect`` picks the policy; the recipe sets nodes and spares)."""
    if not config.worker_args:
        raise ValueError(
            "ElasticConfig.worker_args is empty: say what each node runs after `python`, "
            "e.g. ('-m', 'step_infra.train.job.worker')"
        )
    return ElasticController(config, policy).run()
