"""``ElasticSession``: the worker side of the controller's protocol, for any training loop.

The elastic controller (:mod:`~step_infra.elastic.controller`) learns what workers do from
four sources, all written here so a trainer cannot get them subtly wrong:

* a job-wide *generation* (bumped by global rank 0 at every (re)start and broadcast), which
  tags telemetry rows so a step re-run after a resume never mixes with its first run;
* ``events.jsonl``: ``worker_start`` (membership, resume step, gradient accumulation),
  ``resumed`` (first step after a restart, with its loss), ``checkpoint`` (once durable) and
  ``worker_done``;
* heartbeats with the current phase (``load``, ``step``, ``collective``, ``save``), so
  checkpoint phases get their own timeout, with a liveness pulse, so a frozen rank is told
  from the ranks waiting for it (:class:`~step_infra.elastic.worker_env.Heartbeat`);
* the telemetry store, through a :class:`Recorder` whose ``attempt`` is the generation.

Checkpoints go through the session too (:class:`~step_infra.elastic.checkpoint.Checkpointer`,
torch.distributed.checkpoint), so the save phase is always announced and a checkpoint is
reported only once durable. Every method that touches a checkpoint is collective: call it on
every rank. Events and heartbeats carry the controller's launch id, so a controller resuming
in the same run directory never mistakes an interrupted launch's files for its own workers.

Usage (after ``dist.init_process_group``)::

    session = ElasticSession.begin(global_batch=gb, micro_batch=mb)
    state = state_dict(model, optimizer, -1, tp_rank=0, tp_size=1)  # flat, live tensors
    session.load(state)                    # in place; sets start_step (0 on a fresh start)
    with session.recorder() as rec:
        for step in range(session.start_step, steps):
            ...                            # rec.section("compute")
            session.at_collective(step)    # then rec.collective(...)
            session.step_done(rec, step, loss=loss, tokens=tokens)
            session.poll_checkpoint()      # reports a save that became durable
            if step % every == 0:
                session.checkpoint(step, state)   # async; wait=True to block
    session.final_checkpoint(steps - 1, state)
    session.done(steps - 1)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from step_infra.elastic.worker_env import Heartbeat, WorkerEnv, next_generation
from step_infra.telemetry.events import EventLog
from step_infra.telemetry.recorder import Recorder, RecorderConfig
from step_infra.telemetry.store import ParquetStore

if TYPE_CHECKING:
    import torch

    from step_infra.elastic.checkpoint import Checkpointer

CHECKPOINT_DIR = "checkpoints"


def grad_accumulation(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-batches per rank that keep ``global_batch`` fixed on ``world_size`` ranks."""
    if micro_batch < 1 or global_batch % (micro_batch * world_size):
        raise ValueError(
            f"global batch {global_batch} is not divisible by micro_batch x world = "
            f"{micro_batch} x {world_size}; pick a global batch that every allowed world "
            "size divides"
        )
    return global_batch // (micro_batch * world_size)


@dataclass(slots=True, kw_only=True)
class ElasticSession:
    """One worker's view of the current generation of an elastic job."""

    env: WorkerEnv
    rank: int
    world_size: int
    generation: int
    grad_accum: int
    global_batch: int
    events: EventLog
    heartbeat: Heartbeat
    checkpointer: Checkpointer
    control_group: Any = None  # gloo: CPU tensors, beside the training backend
    # Called on every rank when a checkpoint of a step becomes durable; what it returns is
    # added to the ``checkpoint`` event (e.g. the streaming job acknowledges its items here).
    on_durable: Callable[[int], Mapping[str, Any]] | None = None
    start_step: int = 0
    resumed: bool = False
    _announced: bool = field(default=False, repr=False)

    @classmethod
    def begin(cls, *, global_batch: int, micro_batch: int) -> ElasticSession:
        """Agree on the generation (a broadcast from rank 0); call after init_process_group."""
        import torch
        import torch.distributed as dist

        from step_infra.elastic.checkpoint import Checkpointer

        env = WorkerEnv.from_env()
        rank, world = dist.get_rank(), dist.get_world_size()
        accum = grad_accumulation(global_batch, micro_batch, world)
        # small CPU-side agreements (this generation; the data stream's holders) go over a
        # gloo group of their own, whatever backend (NCCL) the training collectives use
        control = dist.new_group(backend="gloo")
        gen = torch.tensor([next_generation(env.run_dir) if rank == 0 else 0])
        dist.broadcast(gen, src=0, group=control)
        generation = int(gen.item())
        return cls(
            env=env,
            rank=rank,
            world_size=world,
            generation=generation,
            grad_accum=accum,
            global_batch=global_batch,
            events=EventLog(
                env.run_dir, source=f"{env.node}/rank{rank}", context={"launch": env.launch}
            ),
            heartbeat=Heartbeat(env, generation=generation),
            checkpointer=Checkpointer(env.run_dir / CHECKPOINT_DIR),
            control_group=control,
        )

    def load(self, state: dict[str, torch.Tensor]) -> int | None:
        """Load the newest durable checkpoint into ``state`` in place and announce this
        worker; sets :attr:`start_step`. Returns the checkpoint's step (None: fresh start)."""
        self.heartbeat.beat(step=-1, phase="load")
        step = self.checkpointer.load(state)
        if step is not None:
            self.start_step = step + 1
            self.resumed = True
        self.events.emit(
            "worker_start",
            node=self.env.node,
            rank=self.rank,
            world_size=self.world_size,
            generation=self.generation,
            restart_count=self.env.restart_count,
            resume_step=self.start_step,
            grad_accum=self.grad_accum,
            global_batch=self.global_batch,
        )
        return step

    def recorder(self, **overrides: Any) -> Recorder:
        """A Recorder tagged with this rank, node and generation, writing the run's store."""
        settings: dict[str, Any] = {"window_steps": 2, "flush_interval_s": 0.2}
        settings.update(overrides)
        cfg = RecorderConfig(
            rank=self.rank, node=self.env.node, attempt=self.generation, **settings
        )
        return Recorder(cfg, [ParquetStore(self.env.run_dir)])

    def step_done(
        self, rec: Recorder, step: int, *, loss: float, tokens: float | None = None
    ) -> None:
        """Close the step in the recorder, heartbeat, and report the first resumed step."""
        rec.end_step(loss=loss, tokens=tokens)
        if self.resumed and not self._announced and self.rank == 0:
            self.events.emit(
                "resumed",
                node=self.env.node,
                step=step,
                loss=loss,
                world_size=self.world_size,
                generation=self.generation,
                grad_accum=self.grad_accum,
            )
        self._announced = True
        self.heartbeat.beat(step=step, phase="step")

    def at_collective(self, step: int) -> None:
        """Heartbeat on reaching ``step``'s gradient collective. Ranks that wait there for a
        stuck rank are then one phase ahead of it, which names the stuck one in a hang."""
        self.heartbeat.beat(step=step, phase="collective")

    def checkpoint(self, step: int, state: dict[str, torch.Tensor], *, wait: bool = False) -> None:
        """Save ``state`` as of ``step`` (collective). Asynchronous unless ``wait``: the save
        phase covers only the copy (and a previous save still in flight)."""
        self.heartbeat.beat(step=step, phase="save")
        if "meta/step" in state:
            state["meta/step"].fill_(step)
        self._durable(self.checkpointer.wait())
        if wait:
            self._durable(self.checkpointer.save(state, step))
        else:
            self.checkpointer.save_async(state, step)
        self.heartbeat.beat(step=step, phase="step")

    def poll_checkpoint(self) -> int | None:
        """The step of a save that finished since the last call (reported), or None."""
        return self._durable(self.checkpointer.poll())

    def final_checkpoint(self, step: int, state: dict[str, torch.Tensor]) -> None:
        """Finish the save in flight, then save ``step`` synchronously (the job's end): the
        checkpoint timeout applies, not the step timeout."""
        if step < self.start_step:
            return  # nothing was trained in this generation
        self.checkpoint(step, state, wait=True)

    def _durable(self, step: int | None) -> int | None:
        if step is None:
            return None
        extra = dict(self.on_durable(step)) if self.on_durable is not None else {}
        if self.rank == 0:
            self.events.emit("checkpoint", step=step, durable=True, **extra)
        return step

    def done(self, last_step: int) -> None:
        """Tell the controller the job finished (rank 0) and stop this rank's pulse."""
        self.heartbeat.close()
        if self.rank == 0:
            self.events.emit(
                "worker_done", node=self.env.node, step=last_step, generation=self.generation
            )
