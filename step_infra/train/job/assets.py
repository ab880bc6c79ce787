"""What a streaming job needs before and after training: the VAE, the text widths, samples.

The VAE servers encode with a pre-trained Video-VAE. Nothing may be downloaded, so the job
trains its tiny VAE first (a minute on two cores) and caches it, with the scale that gives its
latents unit variance, in ``<run_dir>/assets/vae.pt``; a resumed job reuses it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from step_infra.data.synthetic import SyntheticClips
from step_infra.models.text import TextEncoders
from step_infra.models.vae import VideoVAE, psnr
from step_infra.train.flow import euler_sample
from step_infra.train.job.config import JobConfig
from step_infra.train.loop import OptimConfig, TextCache
from step_infra.train.vae_pretrain import pretrain_vae

log = logging.getLogger(__name__)


def prepare_vae(cfg: JobConfig, path: Path) -> dict[str, float]:
    """Train the VAE (images first, then clips) unless ``path`` exists; report its PSNR."""
    if path.exists():
        return {"cached": 1.0}
    torch.manual_seed(cfg.seed)
    vae = VideoVAE(cfg.vae)
    data = SyntheticClips(cfg.data)
    pretrain_vae(
        vae, data, OptimConfig(steps=cfg.vae_steps, lr=1e-3, warmup_steps=10), seed=cfg.seed
    )
    video = data.batch(list(range(min(64, len(data)))))["video"]
    assert isinstance(video, torch.Tensor)
    with torch.no_grad():
        z = vae.encode(video)[0]
        quality = psnr(vae.decode(z), video)
    state = dict(vae.state_dict())
    state["latent_scale"] = torch.tensor(float(1.0 / z.std()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return {"psnr_db": round(quality, 2), "steps": float(cfg.vae_steps)}


def text_encoders(cfg: JobConfig) -> TextEncoders:
    """The text encoders exactly as the text servers build them (same seed, same weights)."""
    torch.manual_seed(cfg.seed)
    return TextEncoders()


def sample_clips(cfg: JobConfig, run_dir: Path, captions: list[str]) -> list[Path]:
    """Generate clips for ``captions`` with the final weights and write them as GIFs."""
    from step_infra.data.media import write_gif
    from step_infra.train.job.worker import FULL_MODEL, build_model

    model = build_model(cfg)
    model.load_state_dict(torch.load(run_dir / FULL_MODEL, weights_only=True))
    model.eval()
    vae = VideoVAE(cfg.vae)
    state = torch.load(run_dir / "assets" / "vae.pt", weights_only=True)
    scale = float(state.pop("latent_scale"))
    vae.load_state_dict(state)
    text = TextCache(text_encoders(cfg))
    cond, null = text.batch(captions), text.null(len(captions))
    d = cfg.data
    shape = (len(captions), cfg.vae.latent_channels, cfg.vae.latent_frames(d.frames),
             d.height // cfg.vae.spatial, d.width // cfg.vae.spatial)  # fmt: skip
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed + 7))
    with torch.no_grad():
        z = euler_sample(
            lambda x, t: model(x, t, **cond),
            noise,
            steps=cfg.sample_steps,
            uncond=lambda x, t: model(x, t, **null),
            guidance=4.0,
        )
        videos = vae.decode(z / scale).clamp(-1, 1)
    out = []
    for i, caption in enumerate(captions):
        slug = "".join(c if c.isalnum() else "-" for c in caption)[:40]
        out.append(write_gif(videos[i], run_dir / "samples" / f"{i}-{slug}.gif"))
    return out
