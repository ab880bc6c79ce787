"""The job's prediction terms: the encoder servers' CPU per sample, measured with the job's
own VAE, text encoders and a real loopback pipe, and the share of the host it takes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from step_infra.models.vae import VideoVAE
from step_infra.train.job.config import micro_t2v
from step_infra.train.job.prediction import (
    encoder_cpu_in_server_process,
    encoder_cpu_per_sample,
    host_cores,
)


def test_encoder_cpu_per_sample_is_measured(tmp_path: Path) -> None:
    cfg = micro_t2v()
    state = dict(VideoVAE(cfg.vae).state_dict())
    state["latent_scale"] = torch.tensor(1.0)
    torch.save(state, tmp_path / "vae.pt")
    cost = encoder_cpu_per_sample(cfg, tmp_path / "vae.pt")
    assert set(cost) == {"vae_s", "text_s", "pipes_s"}
    # a VAE encode of a tiny clip and a pipe crossing each cost some CPU, well under a second
    assert 0 < cost["vae_s"] < 1.0
    assert 0 < cost["pipes_s"] < 1.0
    # captions repeat: the text encoders run once per distinct caption, not per sample
    assert 0 <= cost["text_s"] < cost["vae_s"] * 10
    assert host_cores() >= 1


def test_encoder_cost_is_measured_in_a_process_set_up_like_a_server(tmp_path: Path) -> None:
    cfg = micro_t2v()
    torch.save(
        {**VideoVAE(cfg.vae).state_dict(), "latent_scale": torch.tensor(1.0)}, tmp_path / "v.pt"
    )
    cost = encoder_cpu_in_server_process(cfg, tmp_path / "v.pt")
    assert set(cost) == {"vae_s", "text_s", "pipes_s"}
    assert all(0 < v < 1.0 for v in cost.values())


def test_encoder_cost_probe_failure_names_the_cause(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="encoder cost probe exited"):
        encoder_cpu_in_server_process(micro_t2v(), tmp_path / "missing.pt")
