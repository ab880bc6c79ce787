"""The Step Emulator's prediction for this job, on this machine's measured profile.

The launcher measures the machine (``step_infra.emulator.hwprobe``, a few seconds, cached in
``assets/hw_profile.json``) with as many ranks at once as the job runs here, prices the job's
layout with :func:`step_infra.emulator.estimate`, and from the predicted step time sizes the
encoder split (servers per kind that feed ``global_batch / step_time`` samples/s). The report
later sets the prediction beside the measured step time.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from step_infra.train.job.config import JobConfig

log = logging.getLogger(__name__)


def latent_tokens(cfg: JobConfig) -> int:
    d, v = cfg.data, cfg.vae
    return v.latent_frames(d.frames) * (d.height // v.spatial) * (d.width // v.spatial)


def predict_step(cfg: JobConfig, profile: Path) -> dict[str, Any]:
    """Predicted step time of the job (and the estimate's breakdown) on ``profile``."""
    from step_infra.emulator import ClusterSpec, Strategy, estimate
    from step_infra.emulator.hwprobe import calibrate, quick_config
    from step_infra.emulator.presets import get_model

    if not profile.exists():
        # every trainer rank of the job shares this host's cores: measure that many at once
        calibrate(profile, cfg=quick_config(threads=1), ranks_per_node=cfg.world_size)
    cluster = ClusterSpec.from_profile(profile, nodes=cfg.nodes)
    cluster = dataclasses.replace(cluster, gpus_per_node=cfg.nproc_per_node)
    model = dataclasses.replace(
        get_model(cfg.dit_preset), seq_len=latent_tokens(cfg), text_tokens=16
    )
    strategy = Strategy(
        tp=cfg.tp,
        dp=cfg.dp,
        micro_batch=cfg.micro_batch,
        global_batch=cfg.global_batch,
        distributed_optimizer=False,
        overlap_grad_reduce=False,  # the trainer reduces once, after backward
    )
    est = estimate(model, cluster, strategy)
    return {
        "step_time_s": est.step_time_s,
        "model": model.name,
        "tokens_per_sample": model.seq_len,
        "layout": f"tp{cfg.tp} dp{cfg.dp} mb{cfg.micro_batch} gb{cfg.global_batch}",
        "breakdown": {k: v for k, v in est.breakdown.items() if isinstance(v, int | float)},
    }
