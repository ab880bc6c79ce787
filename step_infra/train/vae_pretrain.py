"""Pre-training the Video-VAE on clips: images first, then whole clips.

The recipes and the streaming job both need a trained VAE before the DiT can learn (nothing
may be downloaded), and both train it the same way: the first quarter of the steps on single
frames (the causal VAE's first frame is an image), the rest on clips, ``batch`` clips a step.
"""

from __future__ import annotations

import torch

from step_infra.data.synthetic import SyntheticClips
from step_infra.models.vae import VideoVAE
from step_infra.train.loop import OptimConfig, infinite, train


def pretrain_vae(
    vae: VideoVAE, data: SyntheticClips, optim: OptimConfig, *, seed: int, batch: int = 16
) -> list[float]:
    """Train ``vae`` in place on ``data``; returns the loss of every step."""
    batches = infinite(len(data), batch, seed)
    g = torch.Generator().manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        video = data.batch(next(batches))["video"]
        assert isinstance(video, torch.Tensor)
        if step < optim.steps // 4:  # progressive: images first, then clips
            video = video[:, :, :1]
        loss: torch.Tensor = vae(video, generator=g)[1]
        return loss

    return train(vae, loss_fn, optim)
