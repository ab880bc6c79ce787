"""The Step Emulator's prediction for this job, on this machine's measured profile.

The launcher measures the machine (``step_infra.emulator.hwprobe``, a few seconds, cached in
``assets/hw_profile.json``) with as many ranks at once as the job runs here, prices the job's
layout with :func:`step_infra.emulator.estimate`, and from the predicted step time sizes the
encoder split (servers per kind that feed ``global_batch / step_time`` samples/s). The report
later sets the prediction beside the measured step time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from step_infra.train.job.config import JobConfig

log = logging.getLogger(__name__)


def latent_tokens(cfg: JobConfig) -> int:
    d, v = cfg.data, cfg.vae
    return v.latent_frames(d.frames) * (d.height // v.spatial) * (d.width // v.spatial)


def predict_job(cfg: JobConfig, profile: Path) -> dict[str, Any]:
    """Predicted step time of the job (and the estimate's breakdown) on ``profile``."""
    from step_infra.emulator.hwprobe import calibrate, quick_config
    from step_infra.emulator.predict import predict_step

    if not profile.exists():
        # every trainer rank of the job shares this host's cores: measure that many at once
        calibrate(profile, cfg=quick_config(threads=1), ranks_per_node=cfg.world_size)
    est = predict_step(
        cfg.dit_preset,
        profile,
        micro_batch=cfg.micro_batch,
        global_batch=cfg.global_batch,
        tp=cfg.tp,
        dp=cfg.dp,
        nodes=cfg.nodes,
        seq_len=latent_tokens(cfg),
        text_tokens=16,
        overlap_grad_reduce=False,  # the trainer reduces once, after the backward
    )
    return {
        "step_time_s": est.step_time_s,
        "model": cfg.dit_preset,
        "tokens_per_sample": latent_tokens(cfg),
        "layout": f"tp{cfg.tp} dp{cfg.dp} mb{cfg.micro_batch} gb{cfg.global_batch}",
        "breakdown": {k: v for k, v in est.breakdown.items() if isinstance(v, int | float)},
    }
