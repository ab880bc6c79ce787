"""The Step Emulator's prediction for this job, on this machine's measured profile.

The launcher measures the machine (``step_infra.emulator.hwprobe``, a few seconds, cached in
``assets/hw_profile.json``) with as many ranks at once as the job runs here, and prices the
job's layout with :func:`step_infra.emulator.predict_step` (compute, host dispatch, TP/DP
collectives, optimizer; the trainer's eager per-tensor parameter update is priced by its
ops, ``EAGER_UPDATE_OPS_*``). Two terms of this job on this host are added, each measured:

- **data sync**: every step the trainers all-gather which replica holds which sample (the
  exact-batch stream, :mod:`step_infra.data.stream`): one small all-gather over the world,
  ``(world - 1)`` hops of the profile's collective latency;
- **encoders on the trainers' cores**: the encoder servers stand for encoder GPUs, but here
  they run on the same ``C`` cores as the trainers, which keep every core busy. Each step the
  encoders spend ``E = global_batch x (VAE encode + text encode + pipe crossings)`` CPU-seconds
  per sample (measured on the job's own VAE, text encoders and pipes, in a fresh process set
  up as a server is: a process that once ran torch with more threads encodes up to a third
  faster on one thread than a server does), and the trainers wait for them: ``+ E / C`` per
  step. On a cluster, where encoders have their own GPUs, this term is zero and the
  emulator's figure is the prediction.

The report sets the total, with its terms, beside the measured step time; the predicted
consumption (``global_batch / step``) sizes the encoder split with ``--auto-split``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from step_infra import config_io
from step_infra.train.job.config import JobConfig

log = logging.getLogger(__name__)


def latent_tokens(cfg: JobConfig) -> int:
    d, v = cfg.data, cfg.vae
    return v.latent_frames(d.frames) * (d.height // v.spatial) * (d.width // v.spatial)


def host_cores() -> int:
    """Cores this process may run on (what the job's processes share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _median_cpu_s(fn: Any, repeats: int = 5) -> float:
    """Median process CPU seconds of ``fn()`` (after one warm-up call): every thread's work
    counts, as it does in a server's ``cpu_s``."""
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        out.append(time.process_time() - t0)
    return statistics.median(out)


def pipe_crossing_cpu_s(item: dict[str, Any], n: int = 64) -> float:
    """Process CPU seconds per item for one pipe crossing (producer send + consumer take) of
    ``item`` over a real loopback StepRPC pipe in this process."""
    from step_infra.rpc.consumer import Consumer, ConsumerConfig
    from step_infra.rpc.producer import Producer, ProducerConfig

    with Producer("cost-probe", config=ProducerConfig(queue_items=n)) as prod:
        cons = Consumer(
            "cost-probe", [prod.address], group="probe", config=ConsumerConfig(prefetch=16)
        )
        prod.wait_for_consumers(timeout_s=30)
        got: list[int] = []

        def take() -> None:
            while len(got) < n:
                it = cons.get(timeout_s=5)
                if it is None:
                    return
                got.append(it.seq)

        reader = threading.Thread(target=take, daemon=True)
        t0 = time.process_time()
        reader.start()
        for i in range(n):
            prod.send(item, {"id": i})
        while reader.is_alive():
            prod.poll(10)
        cpu = time.process_time() - t0
        cons.close()
    if len(got) < n:
        raise RuntimeError(f"pipe cost probe received {len(got)} of {n} items")
    return cpu / n


def encoder_cpu_in_server_process(
    cfg: JobConfig, vae_path: Path, *, timeout_s: float = 300.0
) -> dict[str, float]:
    """:func:`encoder_cpu_per_sample` measured in a fresh Python process that sets one torch
    thread before any torch work, as ``step_infra.data.servers`` does. The launcher cannot
    measure in its own process: it trained the VAE on every core first, and a process that
    has run torch with several threads runs the one-thread VAE encode 25-35 % cheaper than a
    server does (measured here: 2.8-3.0 vs 4.0-4.1 ms per sample for the tiny VAE)."""
    proc = subprocess.run(
        [sys.executable, "-m", "step_infra.train.job.prediction", "--encoder-cost", str(vae_path)],
        input=config_io.dumps(cfg),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"encoder cost probe exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
        )
    return {k: float(v) for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def encoder_cpu_per_sample(cfg: JobConfig, vae_path: Path) -> dict[str, float]:
    """CPU seconds the encoder side spends per sample, measured with the job's own models:
    VAE encode (in the servers' batches), text encode (amortized over the captions' cache: a
    caption is encoded once), and the pipe crossings (text -> VAE server, VAE server -> each
    tensor-parallel rank of a replica). The figure depends on the calling process's torch
    history; :func:`encoder_cpu_in_server_process` measures it as a server would see it."""
    import torch

    from step_infra.data.servers import VAE_BATCH, caption_of
    from step_infra.data.synthetic import SyntheticClips
    from step_infra.models.vae import VideoVAE
    from step_infra.train.job.assets import text_encoders

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the servers run
    try:
        vae = VideoVAE(cfg.vae)
        state = torch.load(vae_path, weights_only=True)
        state.pop("latent_scale", None)
        vae.load_state_dict(state)
        vae.eval().requires_grad_(False)
        clips = SyntheticClips(cfg.data)
        videos = torch.stack([torch.as_tensor(clips[i]["video"]) for i in range(VAE_BATCH)])
        with torch.no_grad():
            vae_s = _median_cpu_s(lambda: vae.encode(videos)) / VAE_BATCH
            latent = vae.encode(videos[:1])[0][0]
        samples = cfg.steps * cfg.global_batch
        captions = {caption_of(clips, i) for i in range(samples)}
        encoders = text_encoders(cfg)
        eight = sorted(captions)[:8]
        with torch.no_grad():
            feats = encoders(eight)
            text_s = _median_cpu_s(lambda: encoders(eight), repeats=3) / len(eight)
        text_s *= len(captions) / samples  # each distinct caption encoded once
        item = {
            "latent": latent,
            "text_short": feats["text_short"][0],
            "text_long": feats["text_long"][0],
        }
        crossing = pipe_crossing_cpu_s(item)
    finally:
        torch.set_num_threads(threads)
    return {"vae_s": vae_s, "text_s": text_s, "pipes_s": crossing * (1 + cfg.strategy.tp)}


def _current_profile(path: Path) -> bool:
    """A cached profile is reused only if it has every figure the time model now reads
    (one written before the probe timed host dispatch would price this job as a GPU)."""
    if not path.exists():
        return False
    try:
        return "op_overhead_us" in json.loads(path.read_text())["gpu"]
    except (ValueError, KeyError):
        return False


def predict_job(cfg: JobConfig, profile: Path, *, vae_path: Path | None = None) -> dict[str, Any]:
    """Predicted step time of the job on ``profile`` (calibrated here when missing), with its
    terms: the emulator's training step, the data sync, and (given ``vae_path``) the encoders'
    share of this host's cores."""
    from step_infra.emulator.hwprobe import calibrate, quick_config
    from step_infra.emulator.predict import predict_step
    from step_infra.emulator.presets import get_model
    from step_infra.emulator.specs import (
        EAGER_UPDATE_OPS_OUTSIDE_LAYERS,
        EAGER_UPDATE_OPS_PER_LAYER,
        ClusterSpec,
    )

    if not _current_profile(profile):
        # every trainer rank of the job shares this host's cores: measure that many at once;
        # the TP collectives dominate this job, so time many of them (their mean is noisy)
        probe = dataclasses.replace(quick_config(threads=1), gloo_reps=120)
        calibrate(profile, cfg=probe, ranks_per_node=cfg.world_size)
    # the job's trainer updates parameters tensor by tensor (eager AdamW, clip, zero grads)
    spec = dataclasses.replace(
        get_model(cfg.dit_preset),
        update_ops_per_layer=EAGER_UPDATE_OPS_PER_LAYER,
        update_ops_outside_layers=EAGER_UPDATE_OPS_OUTSIDE_LAYERS,
    )
    est = predict_step(
        spec,
        profile,
        micro_batch=cfg.strategy.micro_batch,
        global_batch=cfg.global_batch,
        nodes=cfg.elastic.nodes,
        seq_len=latent_tokens(cfg),
        text_tokens=16,
        strategy=dataclasses.replace(cfg.strategy, dp=cfg.grid.dp),  # the layout as it runs
    )
    cluster = ClusterSpec.from_profile(profile)
    data_sync = (cfg.world_size - 1) * cluster.nic_latency_us * 1e-6
    terms: dict[str, float] = {"training_step_s": est.step_time_s, "data_sync_s": data_sync}
    encoders: dict[str, float] = {}
    if vae_path is not None:
        encoders = encoder_cpu_in_server_process(cfg, vae_path)
        cores = host_cores()
        per_step = cfg.global_batch * sum(encoders.values())
        terms["encoders_on_host_s"] = per_step / cores
        encoders.update(cpu_s_per_step=per_step, host_cores=cores)
    return {
        "step_time_s": sum(terms.values()),
        "terms": terms,
        "emulator_step_s": est.step_time_s,
        "encoder_cpu": encoders,
        "model": cfg.dit_preset,
        "tokens_per_sample": latent_tokens(cfg),
        "layout": f"tp{cfg.grid.tp} pp{cfg.grid.pp} cp{cfg.grid.cp} dp{cfg.grid.dp} "
        f"mb{cfg.strategy.micro_batch} gb{cfg.global_batch}",
        "breakdown": {k: v for k, v in est.breakdown.items() if isinstance(v, int | float)},
    }


def _main(argv: list[str] | None = None) -> None:
    """``python -m step_infra.train.job.prediction --encoder-cost VAE.pt < config.toml``: prints
    :func:`encoder_cpu_per_sample` as one JSON line (the launcher's fresh-process probe)."""
    import argparse

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("--encoder-cost", type=Path, required=True, metavar="VAE_PT")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # first, before any torch work: as the servers start
    cfg = config_io.loads(sys.stdin.read(), JobConfig, source="stdin")
    print(json.dumps(encoder_cpu_per_sample(cfg, args.encoder_cost)))


if __name__ == "__main__":
    _main()
