"""Video-VAE: 8x/16x compression (17 -> 3 latent frames), causality, chunking, loss."""

from __future__ import annotations

import pytest
import torch

from step_infra.models.vae import VAE_PRESETS, VideoVAE, psnr


def test_stepvideo_compression_17_frames_to_3() -> None:
    vae = VideoVAE(VAE_PRESETS["stepvideo-vae-shapes"])
    assert (vae.config.temporal, vae.config.spatial, vae.config.latent_channels) == (8, 16, 64)
    mean, _ = vae.encode(torch.randn(1, 3, 17, 32, 32))
    assert mean.shape == (1, 64, 3, 2, 2)
    assert vae.decode(mean).shape == (1, 3, 17, 32, 32)


def test_encoder_and_decoder_are_causal() -> None:
    torch.manual_seed(0)
    vae = VideoVAE()  # tiny: 4x time, 9 frames -> 3 latent frames
    x = torch.randn(1, 3, 9, 16, 16)
    future = x.clone()
    future[:, :, 5:] += 1.0  # frames 5..8 only reach latent frame 2
    a, _ = vae.encode(x)
    b, _ = vae.encode(future)
    torch.testing.assert_close(a[:, :, :2], b[:, :, :2])
    assert not torch.allclose(a[:, :, 2], b[:, :, 2])
    z = a.clone()
    z[:, :, 2] += 1.0
    da, db = vae.decode(a), vae.decode(z)
    torch.testing.assert_close(da[:, :, :5], db[:, :, :5])
    assert not torch.allclose(da[:, :, 5:], db[:, :, 5:])


def test_chunked_encoding_equals_per_chunk() -> None:
    vae = VideoVAE()
    x = torch.randn(1, 3, 18, 16, 16)
    mean, _ = vae.encode(x)
    assert mean.shape[2] == 6
    first, _ = vae.encode(x[:, :, :9])
    second, _ = vae.encode(x[:, :, 9:])
    torch.testing.assert_close(mean, torch.cat([first, second], dim=2))
    with pytest.raises(ValueError, match="chunks of 9"):
        vae.encode(torch.randn(1, 3, 13, 16, 16))


def test_loss_backward_and_psnr() -> None:
    vae = VideoVAE()
    x = torch.rand(2, 3, 9, 16, 16) * 2 - 1
    recon, loss = vae(x, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert recon.shape == x.shape and torch.isfinite(loss)
    assert psnr(x, x) > 100 and psnr(torch.zeros_like(x), x) < 12
