"""``step-infra train``: the whole job as real processes, from encoders to elastic trainers.

Order of events: apply the plan (layout, batch, encoder split) -> pre-train the VAE (cached)
-> start the StepRPC registry, then the text-encoder and VAE servers, and wait until every
producer is registered -> run the trainers under the elastic controller (TorchElastic agents,
hot spares, straggler eviction, restarts from the last durable checkpoint) while a fault
injector sends ``kill -9`` where the config asks -> stop the servers and the registry ->
sample clips from the final weights -> write ``report.html``.

Every child is started here, in its own process group, and stopped here (SIGTERM, then
SIGKILL after a grace period) whatever happens, Ctrl-C included, so no process outlives the
job. A job started again on the same run directory resumes from its last durable checkpoint,
with the encoders restarted at the first sample that checkpoint does not cover.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console

from step_infra.console import make_console
from step_infra.data.servers import LATENT_PIPE, TEXT_PIPE, TOKEN_ENV, ServerConfig
from step_infra.telemetry.elastic import ElasticConfig, ElasticController, ElasticResult
from step_infra.telemetry.events import EventLog, read_events
from step_infra.telemetry.worker_support import read_heartbeats
from step_infra.train.job.checkpoint import durable_step, latest_durable
from step_infra.train.job.config import JOB_DETECTOR, JobConfig
from step_infra.train.job.worker import REGISTRY_ENV

log = logging.getLogger(__name__)

WORKER = ("-m", "step_infra.train.job.worker")


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


@dataclass(slots=True)
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: IO[bytes]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Children:
    """Processes the launcher owns; stopped in reverse order of start."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.children: list[_Child] = []

    def start(self, name: str, args: list[str]) -> _Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, *args],
            env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        child = _Child(name, proc, out)
        self.children.append(child)
        return child

    def check(self) -> None:
        for c in self.children:
            code = c.proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"{c.name} exited with {code}; see {self.log_dir / (c.name + '.log')}"
                )

    def stop_all(self, grace_s: float = 10.0) -> None:
        for c in reversed(self.children):
            if c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for c in reversed(self.children):
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait(timeout=5)
            c.log.close()
        self.children.clear()


class _KillInjector(threading.Thread):
    """Sends SIGKILL to ``node``'s first trainer once it reports ``at_step`` (kill -9)."""

    def __init__(self, run_dir: Path, node: str, at_step: int, events: EventLog) -> None:
        super().__init__(daemon=True, name="kill-injector")
        self.run_dir, self.node, self.at_step, self.events = run_dir, node, at_step, events
        self.done = threading.Event()
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
                    self.done.set()
                    return


class _EventPrinter(threading.Thread):
    """Prints the controller's and launcher's events while the job runs."""

    SHOWN = (
        "detection",
        "eviction",
        "spare_activated",
        "restart",
        "join",
        "recovered",
        "fault_injected",
        "hang",
    )

    def __init__(self, run_dir: Path, console: Console) -> None:
        super().__init__(daemon=True, name="event-printer")
        self.run_dir, self.console = run_dir, console
        self.stop = threading.Event()
        self._seen = len(read_events(run_dir))
        self._last_step = -1

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.flush()

    def flush(self) -> None:
        events = read_events(self.run_dir)
        for ev in events[self._seen :]:
            kind = ev["event"]
            if kind == "checkpoint" and int(ev.get("step", -1)) > self._last_step:
                self._last_step = int(ev["step"])
                self.console.print(f"  checkpoint  step {ev['step']} durable")
            elif kind in self.SHOWN:
                keep = ("node", "step", "generation", "resume_step", "reason", "kind", "pid")
                detail = ", ".join(f"{k}={ev[k]}" for k in keep if k in ev)
                self.console.print(f"  [bold]{kind:<11}[/] {detail}")
        self._seen = len(events)


def apply_plan(cfg: JobConfig, plan: Path) -> JobConfig:
    """Take layout, batch and encoder split from a ``step-infra plan`` strategy TOML."""
    import tomllib

    doc = tomllib.loads(Path(plan).read_text())
    s = doc.get("strategy", {})
    changes: dict[str, Any] = {}
    if "tp" in s:
        changes["tp"] = int(s["tp"])
    for key in ("global_batch", "micro_batch"):
        if key in s:
            changes[key] = int(s[key])
    alloc = doc.get("allocation", {})
    if "vae_gpus" in alloc:
        changes["vae_servers"] = int(alloc["vae_gpus"])
    if "text_gpus" in alloc:
        changes["text_servers"] = int(alloc["text_gpus"])
    out = cfg.replace(**changes)
    for bad in ("pp", "cp"):
        if int(s.get(bad, 1)) != 1:
            raise ValueError(
                f"plan {plan}: {bad}={s[bad]}; the streaming trainer supports tp x dp only"
            )
    dp = int(s.get("dp", out.dp))
    if dp * out.tp != out.world_size:
        raise ValueError(
            f"plan {plan}: tp={out.tp} x dp={dp} = {dp * out.tp} ranks, but the job has "
            f"{out.nodes} nodes x {out.nproc_per_node} ranks = {out.world_size}"
        )
    return out


def run_training_job(
    cfg: JobConfig,
    run_dir: Path,
    *,
    console: Console | None = None,
    fresh: bool = False,
    job_timeout_s: float = 900.0,
    sample: bool = True,
    report: bool = True,
    predict: bool = True,
    auto_split: bool = False,
    registry: str | None = None,
) -> TrainResult:
    """Run (or resume) the job in ``run_dir``; blocks until it ends. See the module doc."""
    from step_infra.train.job.assets import prepare_vae, text_encoders

    console = console or make_console()
    t0 = time.monotonic()
    run_dir = Path(run_dir)
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    encoders = text_encoders(cfg)
    short, long_ = encoders.dims
    cfg = cfg.replace(text_dim_short=short, text_dim_long=long_)
    del encoders
    console.print(
        f"VAE: {'cached' if (run_dir / 'assets/vae.pt').exists() else 'pre-training'} ..."
    )
    vae = prepare_vae(cfg, run_dir / "assets" / "vae.pt")
    if "psnr_db" in vae:
        console.print(f"  VAE trained {int(vae['steps'])} steps, PSNR {vae['psnr_db']} dB")
    if predict:
        cfg = _predict(cfg, run_dir, console, auto_split=auto_split)
    cfg.save(run_dir)
    durable = latest_durable(run_dir / "checkpoints")
    start_id = 0 if durable is None else (durable_step(durable) + 1) * cfg.global_batch
    if start_id:
        console.print(f"resuming: checkpoint {durable.name if durable else ''}, sample {start_id}")
    # join a running registry (its token from STEP_TOKEN), or start one with a fresh token
    token = os.environ.get(TOKEN_ENV, "") if registry else secrets.token_urlsafe(16)
    registry_addr = registry or f"127.0.0.1:{_free_port()}"
    children = _Children(run_dir / "logs", {TOKEN_ENV: token})
    events = EventLog(run_dir, source="launcher")
    result = TrainResult(ok=False, reason="not run", run_dir=run_dir, vae=vae)
    printer = _EventPrinter(run_dir, console)
    injector: _KillInjector | None = None
    try:
        if registry is None:
            children.start(
                "registry",
                ["-c", "from step_infra.cli import app; app()", "registry",
                 "--port", registry_addr.rsplit(":", 1)[1], "--lease-s", str(cfg.lease_s * 4),
                 "--run-s", str(job_timeout_s + 600)],  # stops by itself if we are killed
            )  # fmt: skip
        server_cfg = ServerConfig(
            run_dir=str(run_dir),
            registry=registry_addr,
            data=cfg.data,
            vae=cfg.vae,
            vae_checkpoint=str(run_dir / "assets" / "vae.pt"),
            start_id=start_id,
            end_id=cfg.steps * cfg.global_batch,
            text_servers=cfg.text_servers,
            vae_servers=cfg.vae_servers,
            text_rate=cfg.text_rate,
            vae_rate=cfg.vae_rate,
            lease_s=cfg.lease_s,
            vae_queue_items=cfg.global_batch,
            seed=cfg.seed,
        )
        server_cfg.save(run_dir / "servers.json")
        module = ["-m", "step_infra.data.servers", "--config", str(run_dir / "servers.json")]
        for i in range(cfg.text_servers):
            children.start(f"text{i}", [*module, "--role", "text", "--index", str(i)])
        for i in range(cfg.vae_servers):
            children.start(f"vae{i}", [*module, "--role", "vae", "--index", str(i)])
        events.emit(
            "servers_start",
            text_servers=cfg.text_servers,
            vae_servers=cfg.vae_servers,
            text_rate=cfg.text_rate,
            vae_rate=cfg.vae_rate,
            start_id=start_id,
            registry=registry_addr,
        )
        console.print(
            f"registry {registry_addr}; {cfg.text_servers} text server(s) at {cfg.text_rate:g}/s, "
            f"{cfg.vae_servers} VAE server(s) at {cfg.vae_rate:g}/s each"
        )
        _wait_for_pipes(registry_addr, token, cfg, children)
        elastic_cfg = ElasticConfig(
            run_dir=run_dir,
            detector=JOB_DETECTOR,
            policy=cfg.eviction,
            metrics_port=cfg.metrics_port,
            worker_args=WORKER,
            nodes=cfg.nodes,
            spares=cfg.spares,
            nproc_per_node=cfg.nproc_per_node,
            slow=cfg.faults.slow,
            steps_total=cfg.steps,
            job_timeout_s=job_timeout_s,
            extra_env={TOKEN_ENV: token, REGISTRY_ENV: registry_addr, "OMP_NUM_THREADS": "1"},
        )
        console.print(
            f"trainers: {cfg.nodes} nodes x {cfg.nproc_per_node} ranks (tp={cfg.tp}, dp={cfg.dp}) "
            f"+ {cfg.spares} hot spare(s); {cfg.steps} steps of {cfg.global_batch} samples"
        )
        target = cfg.faults.kill_target()
        if target is not None and start_id == 0:
            injector = _KillInjector(run_dir, target[0], target[1], events)
            injector.start()
        printer.start()
        elastic = ElasticController(elastic_cfg).run()
        result.elastic = elastic
        result.ok, result.reason = elastic.ok, elastic.reason
    except KeyboardInterrupt:
        result.reason = "interrupted (Ctrl-C)"
        events.emit("interrupted")
    except (RuntimeError, TimeoutError) as exc:
        result.reason = str(exc)
        events.emit("job_failed", reason=str(exc))
    finally:
        if injector is not None:
            injector.stop.set()
        printer.stop.set()
        children.stop_all()
        printer.flush()
    last = latest_durable(run_dir / "checkpoints")
    console.print(
        f"[{'green' if result.ok else 'red'}]{result.reason}[/]; last durable checkpoint: "
        f"{last.name if last else 'none'}"
    )
    if result.ok and sample:
        from step_infra.train.job.assets import sample_clips

        result.samples = sample_clips(cfg, run_dir, _sample_captions(cfg.sample_prompts))
    if report:
        from step_infra.train.job.report import write_job_report

        result.report = write_job_report(run_dir)
    result.wall_s = round(time.monotonic() - t0, 1)
    return result


def _predict(cfg: JobConfig, run_dir: Path, console: Console, *, auto_split: bool) -> JobConfig:
    """Emulator prediction of the step (saved for the report); with ``auto_split`` it also
    sizes the encoder servers to feed the predicted consumption."""
    import json

    from step_infra.train.job.config import encoder_split
    from step_infra.train.job.prediction import predict_job

    console.print("Step Emulator: measuring this machine and pricing the job's layout ...")
    try:
        assets = run_dir / "assets"
        pred = predict_job(cfg, assets / "hw_profile.json", vae_path=assets / "vae.pt")
    except Exception as exc:  # the prediction informs; it never stops a training job
        log.warning("no emulator prediction: %s", exc)
        console.print(f"  [yellow]no prediction[/]: {exc}")
        return cfg
    consumption = cfg.global_batch / pred["step_time_s"]
    pred["consumption_per_s"] = consumption
    if auto_split:
        vae, text = encoder_split(consumption, vae_rate=cfg.vae_rate, text_rate=cfg.text_rate)
        cfg = cfg.replace(vae_servers=vae, text_servers=text)
    pred.update(vae_servers=cfg.vae_servers, text_servers=cfg.text_servers)
    (run_dir / "prediction.json").write_text(json.dumps(pred, indent=2))
    terms = pred.get("terms", {})
    console.print(
        f"  training step {terms.get('training_step_s', 0):.3f} s + data sync "
        f"{terms.get('data_sync_s', 0):.3f} s + encoders on this host's cores "
        f"{terms.get('encoders_on_host_s', 0):.3f} s"
    )
    console.print(
        f"  predicted step {pred['step_time_s']:.3f} s ({pred['layout']}): trainers consume "
        f"{consumption:.1f} samples/s -> {cfg.vae_servers} VAE server(s) x {cfg.vae_rate:g}/s, "
        f"{cfg.text_servers} text server(s) x {cfg.text_rate:g}/s"
    )
    return cfg


def _sample_captions(n: int) -> list[str]:
    from step_infra.data.synthetic import COLORS, DIRECTIONS, SHAPES, ClipSpec

    combos = [(c, s, d) for d in DIRECTIONS for c in COLORS for s in SHAPES]
    out = []
    for i in range(n):
        c, s, d = combos[(i * 7) % len(combos)]
        spec = ClipSpec(color=c, shape=s, direction=d, start_xy=(0, 0), radius=1, travel=1)
        out.append(spec.caption("en" if i % 2 == 0 else "zh"))
    return out


def _wait_for_pipes(address: str, token: str, cfg: JobConfig, children: _Children) -> None:
    """Block until every encoder server registered its producer (or one died)."""
    from step_infra.rpc.registry import RegistryClient

    client = RegistryClient(address, token)
    deadline = time.monotonic() + 180.0
    try:
        while time.monotonic() < deadline:
            children.check()
            try:
                text = len(client.producer_addresses(TEXT_PIPE))
                lat = len(client.producer_addresses(LATENT_PIPE))
            except Exception:  # the registry is starting, or no pipe yet
                text = lat = 0
            if text >= cfg.text_servers and lat >= cfg.vae_servers:
                return
            time.sleep(0.2)
        raise TimeoutError("encoder servers did not register within 180 s; see logs/")
    finally:
        client.close()
