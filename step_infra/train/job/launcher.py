"""``step-infra train``: the whole job as real processes, from encoders to elastic trainers.

A :class:`TrainingJob` runs named phases, in order:

1. ``assets``: the text encoders' widths, and the VAE (pre-trained once, cached);
2. ``predict``: the emulator's prediction of the step (and, with ``auto_split``, the encoder
   servers sized to feed it);
3. ``services``: the StepRPC registry, then the text-encoder and VAE servers, until every
   producer is registered;
4. ``train``: the trainers under the elastic controller (TorchElastic agents, hot spares,
   straggler eviction, restarts from the last durable checkpoint), while a fault injector
   sends ``kill -9`` where the config asks;
5. ``sample`` clips from the final weights, and ``report`` (``report.html``).

The library does not print: each phase reports :class:`JobEvent` objects to ``on_event``
(the CLI and the demo render them, :mod:`step_infra.train.job.progress`), and the controller's
own events go to ``events.jsonl``. Every child is started through one
:class:`~step_infra.elastic.processes.Supervisor` and stopped by it (SIGTERM, then SIGKILL
after a grace period) whatever happens, Ctrl-C included, so no process outlives the job. A job
started again on the same run directory resumes from its last durable checkpoint, with the
encoders restarted at the first sample that checkpoint does not cover.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from step_infra.config_io import to_builtins
from step_infra.data.servers import LATENT_PIPE, TEXT_PIPE, TOKEN_ENV
from step_infra.data.synthetic import eval_captions
from step_infra.elastic.checkpoint import durable_step, latest_durable
from step_infra.elastic.controller import ElasticController, ElasticResult
from step_infra.elastic.processes import Supervisor
from step_infra.elastic.worker_env import read_heartbeats
from step_infra.telemetry.events import EventLog
from step_infra.train.job.config import CONFIG_FILE, JobConfig, encoder_split, trainer_layout
from step_infra.train.job.worker import REGISTRY_ENV

log = logging.getLogger(__name__)

WORKER = ("-m", "step_infra.train.job.worker")
PHASES = ("assets", "predict", "services", "train", "sample", "report")


@dataclass(frozen=True, slots=True)
class JobEvent:
    """Something a phase did, for whoever shows the job's progress."""

    phase: str
    kind: str  # "start", "done", "info", "warning", "error"
    message: str
    fields: dict[str, Any] = field(default_factory=dict)


EventSink = Callable[[JobEvent], None]


def log_event(event: JobEvent) -> None:
    """The default sink: the ``logging`` module."""
    level = logging.WARNING if event.kind in ("warning", "error") else logging.INFO
    log.log(level, "[%s] %s", event.phase, event.message)


@dataclass(slots=True, kw_only=True)
class TrainResult:
    """What the job did, for the CLI, the demo and the tests."""

    ok: bool
    reason: str
    run_dir: Path
    elastic: ElasticResult | None = None
    report: Path | None = None
    samples: list[Path] = field(default_factory=list)
    vae: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _KillInjector(threading.Thread):
    """Sends SIGKILL to ``node``'s first trainer once it reports ``at_step`` (kill -9)."""

    def __init__(self, run_dir: Path, node: str, at_step: int, events: EventLog) -> None:
        super().__init__(daemon=True, name="kill-injector")
        self.run_dir, self.node, self.at_step, self.events = run_dir, node, at_step, events
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            for hb in read_heartbeats(self.run_dir):
                if (
                    hb.get("node") == self.node
                    and hb.get("phase") == "step"
                    and int(hb.get("step", -1)) >= self.at_step
                    and "pid" in hb
                ):
                    pid = int(hb["pid"])
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        self.events.emit(
                            "fault_injected",
                            kind="kill -9",
                            node=self.node,
                            rank=hb.get("rank"),
                            pid=pid,
                            step=int(hb["step"]),
                        )
                    return


class TrainingJob:
    """One run of a :class:`JobConfig` in ``run_dir``; :meth:`run` runs every phase."""

    def __init__(
        self,
        cfg: JobConfig,
        run_dir: Path,
        *,
        on_event: EventSink = log_event,
        job_timeout_s: float = 900.0,
        auto_split: bool = False,
        registry: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        # What the controller runs is part of the job's config (and of its config.toml);
        # only the environment (the job token, the registry's address) is added at launch.
        self.cfg = cfg.replace(
            elastic=dataclasses.replace(
                cfg.elastic,
                run_dir=self.run_dir,
                worker_args=WORKER,
                slow=cfg.faults.slow,
                steps_total=cfg.steps,
                job_timeout_s=job_timeout_s,
            )
        )
        self.on_event = on_event
        self.job_timeout_s = job_timeout_s
        self.auto_split = auto_split
        self.external_registry = registry
        # join a running registry (its token from STEP_TOKEN), or start one with a fresh token
        self.token = os.environ.get(TOKEN_ENV, "") if registry else secrets.token_urlsafe(16)
        host = cfg.servers.host  # the job's services bind and advertise this address
        self.registry = registry or f"{host}:{_free_port(host)}"
        self.children = Supervisor(
            self.run_dir / "logs", {TOKEN_ENV: self.token, "OMP_NUM_THREADS": "1"}
        )
        self.events = EventLog(self.run_dir, source="launcher")
        self.result = TrainResult(ok=False, reason="not run", run_dir=self.run_dir)
        self.start_id = 0

    def notify(self, phase: str, kind: str, message: str, **fields: Any) -> None:
        self.on_event(JobEvent(phase, kind, message, fields))

    # ------------------------------------------------------------------ phases
    def assets(self) -> None:
        from step_infra.train.job.assets import prepare_vae, text_encoders

        encoders = text_encoders(self.cfg)
        short, long_ = encoders.dims
        self.cfg = self.cfg.replace(text_dim_short=short, text_dim_long=long_)
        del encoders
        vae_path = self.run_dir / "assets" / "vae.pt"
        cached = vae_path.exists()
        self.notify("assets", "start", f"VAE: {'cached' if cached else 'pre-training'} ...")
        self.result.vae = prepare_vae(self.cfg, vae_path)
        if "psnr_db" in self.result.vae:
            v = self.result.vae
            self.notify(
                "assets",
                "done",
                f"VAE trained {int(v['steps'])} steps, PSNR {v['psnr_db']} dB",
                **v,
            )

    def predict(self) -> None:
        """Emulator prediction of the step (saved for the report); with ``auto_split`` it
        also sizes the encoder servers to feed the predicted consumption."""
        from step_infra.train.job.prediction import predict_job

        cfg = self.cfg
        self.notify(
            "predict",
            "start",
            "Step Emulator: measuring this machine and pricing the job's layout ...",
        )
        assets = self.run_dir / "assets"
        try:
            pred = predict_job(cfg, assets / "hw_profile.json", vae_path=assets / "vae.pt")
        except Exception as exc:  # the prediction informs; it never stops a training job
            self.notify("predict", "warning", f"no prediction: {exc}")
            return
        consumption = cfg.global_batch / pred["step_time_s"]
        pred["consumption_per_s"] = consumption
        if self.auto_split:
            s = cfg.servers
            vae, text = encoder_split(consumption, vae_rate=s.vae_rate, text_rate=s.text_rate)
            cfg = cfg.replace(servers=dataclasses.replace(s, vae_servers=vae, text_servers=text))
            self.cfg = cfg
        s = cfg.servers
        pred.update(vae_servers=s.vae_servers, text_servers=s.text_servers)
        (self.run_dir / "prediction.json").write_text(json.dumps(pred, indent=2))
        terms = pred.get("terms", {})
        self.notify(
            "predict",
            "info",
            f"training step {terms.get('training_step_s', 0):.3f} s + data sync "
            f"{terms.get('data_sync_s', 0):.3f} s + encoders on this host's cores "
            f"{terms.get('encoders_on_host_s', 0):.3f} s",
        )
        self.notify(
            "predict",
            "done",
            f"predicted step {pred['step_time_s']:.3f} s ({pred['layout']}): trainers consume "
            f"{consumption:.1f} samples/s -> {s.vae_servers} VAE server(s) x {s.vae_rate:g}/s, "
            f"{s.text_servers} text server(s) x {s.text_rate:g}/s",
            **pred,
        )

    def services(self) -> None:
        """The registry (unless joining one), the encoder servers, until all registered."""
        cfg, s = self.cfg, self.cfg.servers
        if self.external_registry is None:
            self.children.start(
                "registry",
                [sys.executable, "-m", "step_infra.rpc.registry", "--host", s.host,
                 "--port", self.registry.rsplit(":", 1)[1], "--lease-s", str(s.lease_s * 4),
                 "--run-s", str(self.job_timeout_s + 600)],  # stops by itself if we are killed
            )  # fmt: skip
        server = [sys.executable, "-m", "step_infra.data.servers",
                  "--config", str(self.run_dir / CONFIG_FILE), "--registry", self.registry,
                  "--start-id", str(self.start_id), "--end-id", str(cfg.steps * cfg.global_batch),
                  "--queue-items", str(cfg.global_batch)]  # fmt: skip
        for i in range(s.text_servers):
            self.children.start(f"text{i}", [*server, "--role", "text", "--index", str(i)])
        for i in range(s.vae_servers):
            self.children.start(f"vae{i}", [*server, "--role", "vae", "--index", str(i)])
        self.events.emit(
            "servers_start", **to_builtins(s), start_id=self.start_id, registry=self.registry
        )
        self.notify(
            "services",
            "info",
            f"registry {self.registry}; {s.text_servers} text server(s) at {s.text_rate:g}/s, "
            f"{s.vae_servers} VAE server(s) at {s.vae_rate:g}/s each",
        )
        self._wait_for_pipes()

    def train(self) -> ElasticResult:
        cfg, e = self.cfg, self.cfg.elastic
        env = {TOKEN_ENV: self.token, REGISTRY_ENV: self.registry, "OMP_NUM_THREADS": "1"}
        elastic_cfg = dataclasses.replace(e, extra_env=env)
        self.notify(
            "train",
            "start",
            f"trainers: {e.nodes} nodes x {e.nproc_per_node} ranks ({trainer_layout(cfg)}) "
            f"+ {e.spares} hot spare(s); {cfg.steps} steps of {cfg.global_batch} samples",
        )
        injector = None
        target = cfg.faults.kill_target()
        if target is not None and self.start_id == 0:
            injector = _KillInjector(self.run_dir, target[0], target[1], self.events)
            injector.start()
        try:
            return ElasticController(elastic_cfg).run()
        finally:
            if injector is not None:
                injector.stop.set()

    def sample(self) -> None:
        from step_infra.train.job.assets import sample_clips

        captions = eval_captions(self.cfg.sample_prompts, "both")
        self.result.samples = sample_clips(self.cfg, self.run_dir, captions)
        self.notify(
            "sample", "done", f"{len(self.result.samples)} clips in {self.run_dir / 'samples'}"
        )

    def report(self) -> None:
        from step_infra.train.job.report import write_job_report

        self.result.report = write_job_report(self.run_dir)

    # --------------------------------------------------------------------- run
    def run(
        self, *, fresh: bool = False, sample: bool = True, report: bool = True, predict: bool = True
    ) -> TrainResult:
        """Every phase in order; blocks until the job ends. See the module doc."""
        t0 = time.monotonic()
        if fresh and self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.assets()
        if predict:
            self.predict()
        self.cfg.save(self.run_dir)
        durable = latest_durable(self.run_dir / "checkpoints")
        if durable is not None:
            self.start_id = (durable_step(durable) + 1) * self.cfg.global_batch
            self.notify(
                "train", "info", f"resuming: checkpoint {durable.name}, sample {self.start_id}"
            )
        try:
            self.services()
            elastic = self.train()
            self.result.elastic = elastic
            self.result.ok, self.result.reason = elastic.ok, elastic.reason
        except KeyboardInterrupt:
            self.result.reason = "interrupted (Ctrl-C)"
            self.events.emit("interrupted")
        except (RuntimeError, TimeoutError) as exc:
            self.result.reason = str(exc)
            self.events.emit("job_failed", reason=str(exc))
        finally:
            self.children.stop_all()
        last = latest_durable(self.run_dir / "checkpoints")
        self.notify(
            "train",
            "done" if self.result.ok else "error",
            f"{self.result.reason}; last durable checkpoint: {last.name if last else 'none'}",
            ok=self.result.ok,
        )
        if self.result.ok and sample:
            self.sample()
        if report:
            self.report()
        self.result.wall_s = round(time.monotonic() - t0, 1)
        return self.result

    def _wait_for_pipes(self) -> None:
        """Block until every encoder server registered its producer (or one died)."""
        from step_infra.rpc.registry import RegistryClient

        s = self.cfg.servers
        client = RegistryClient(self.registry, self.token)
        deadline = time.monotonic() + 180.0
        try:
            while time.monotonic() < deadline:
                self.children.check()
                try:
                    text = len(client.producer_addresses(TEXT_PIPE))
                    lat = len(client.producer_addresses(LATENT_PIPE))
                except Exception:  # the registry is starting, or no pipe yet
                    text = lat = 0
                if text >= s.text_servers and lat >= s.vae_servers:
                    return
                time.sleep(0.2)
            raise TimeoutError("encoder servers did not register within 180 s; see logs/")
        finally:
            client.close()


def run_training_job(
    cfg: JobConfig,
    run_dir: Path,
    *,
    on_event: EventSink = log_event,
    fresh: bool = False,
    job_timeout_s: float = 900.0,
    sample: bool = True,
    report: bool = True,
    predict: bool = True,
    auto_split: bool = False,
    registry: str | None = None,
) -> TrainResult:
    """Run (or resume) the job in ``run_dir`` (:class:`TrainingJob`); blocks until it ends."""
    job = TrainingJob(
        cfg,
        run_dir,
        on_event=on_event,
        job_timeout_s=job_timeout_s,
        auto_split=auto_split,
        registry=registry,
    )
    return job.run(fresh=fresh, sample=sample, report=report, predict=predict)
