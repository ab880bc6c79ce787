"""A causal Video-VAE with dual-path down/up-sampling, in the style of Step-Video's.

- Causal 3D convolutions: time is padded on the left only (by repeating the first frame), so
  output frame ``t`` depends on input frames ``<= t``.
- Dual path in every resampling step: a parameter-free path (space/time-to-depth followed by a
  channel-group mean; on the way up, channel repeat and depth-to-space) summed with a learned
  path (a causal convolution on the same rearranged tensor). The shortcut carries the signal
  from the first step of training; the convolutions learn the residual.
- The first frame is kept: a chunk of ``1 + k * T`` frames gives ``1 + k`` latent frames for a
  temporal factor ``T`` (17 -> 3 with ``T = 8``), because ``T - 1`` copies of the first frame
  are prepended before each temporal fold and dropped after each unfold.
- Normalization is per frame (a clip-wide GroupNorm would let the future leak in).
- Long videos are encoded chunk by chunk (``chunk_frames``), independently, and decoded so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, slots=True, kw_only=True)
class VAEConfig:
    """Shapes of the Video-VAE. ``factors`` lists (temporal, spatial) folds per level."""

    channels: int = 32
    latent_channels: int = 16
    factors: tuple[tuple[int, int], ...] = ((2, 2), (2, 2))
    chunk_frames: int = 9
    kl_weight: float = 1e-4

    @property
    def temporal(self) -> int:
        return math.prod(t for t, _ in self.factors)

    @property
    def spatial(self) -> int:
        return math.prod(s for _, s in self.factors)

    def latent_frames(self, frames: int) -> int:
        if (frames - 1) % self.temporal:
            raise ValueError(
                f"{frames} frames do not fold causally by {self.temporal}: need 1 + k*{self.temporal}"
            )
        return 1 + (frames - 1) // self.temporal


VAE_PRESETS: dict[str, VAEConfig] = {
    "tiny-vae": VAEConfig(),  # 9 x 16 x 16 clip -> 3 x 4 x 4 x 16 latents
    # Step-Video's compression (8x time, 16x space, 64 channels), narrow for tests.
    "stepvideo-vae-shapes": VAEConfig(
        channels=16,
        latent_channels=64,
        factors=((2, 2), (2, 2), (2, 2), (1, 2)),
        chunk_frames=17,
    ),
}


class CausalConv3d(nn.Module):
    """3D convolution that sees only the current and past frames."""

    def __init__(self, cin: int, cout: int, kernel: int = 3) -> None:
        super().__init__()
        self.pad_t = kernel - 1
        self.pad_s = kernel // 2
        self.conv = nn.Conv3d(cin, cout, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        if self.pad_t:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.pad_t, -1, -1), x], dim=2)
        x = F.pad(x, (self.pad_s,) * 4 + (0, 0), mode="replicate")
        return self.conv(x)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame: a whole-clip norm would leak future frames."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.view(b, t, c, h, w).transpose(1, 2)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = FrameGroupNorm(min(8, cin), cin)
        self.conv1 = CausalConv3d(cin, cout)
        self.norm2 = FrameGroupNorm(min(8, cout), cout)
        self.conv2 = CausalConv3d(cout, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.silu(self.norm1(x)))
        y = self.conv2(F.silu(self.norm2(y)))
        return self.skip(x) + y


def _fold(x: torch.Tensor, ft: int, fs: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C ft fs fs, 1 + (T-1)/ft, H/fs, W/fs), first frame kept."""
    if ft > 1:
        x = torch.cat([x[:, :, :1].expand(-1, -1, ft - 1, -1, -1), x], dim=2)
    b, c, t, h, w = x.shape
    x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * ft * fs * fs, t // ft, h // fs, w // fs)


def _unfold(x: torch.Tensor, ft: int, fs: int) -> torch.Tensor:
    """Inverse of :func:`_fold`."""
    b, cf, t, h, w = x.shape
    c = cf // (ft * fs * fs)
    x = x.view(b, c, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(b, c, t * ft, h * fs, w * fs)
    return x[:, :, ft - 1 :]


class DualDown(nn.Module):
    """Fold time/space into channels; shortcut = channel-group mean, plus a causal conv."""

    def __init__(self, cin: int, cout: int, ft: int, fs: int) -> None:
        super().__init__()
        self.ft, self.fs, self.cout = ft, fs, cout
        folded = cin * ft * fs * fs
        if folded % cout:
            raise ValueError(f"folded channels {folded} not divisible by {cout}")
        self.conv = CausalConv3d(folded, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _fold(x, self.ft, self.fs)
        b, c, t, h, w = y.shape
        shortcut = y.view(b, self.cout, c // self.cout, t, h, w).mean(2)
        return shortcut + self.conv(y)


class DualUp(nn.Module):
    """Inverse of :class:`DualDown`: shortcut = channel repeat then unfold, plus a causal conv."""

    def __init__(self, cin: int, cout: int, ft: int, fs: int) -> None:
        super().__init__()
        self.ft, self.fs = ft, fs
        folded = cout * ft * fs * fs
        if folded % cin:
            raise ValueError(f"unfolded channels {folded} not divisible by {cin}")
        self.repeat = folded // cin
        self.conv = CausalConv3d(cin, folded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x.repeat_interleave(self.repeat, dim=1)
        return _unfold(shortcut + self.conv(x), self.ft, self.fs)


class VideoVAE(nn.Module):
    """``encode``: ``[B, 3, T, H, W]`` in [-1, 1] -> posterior mean/logvar; ``decode`` back."""

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or VAEConfig()
        ch = c.channels
        self.enc_in = CausalConv3d(3, ch)
        self.enc = nn.ModuleList()
        for ft, fs in c.factors:
            self.enc.append(ResBlock(ch, ch))
            self.enc.append(DualDown(ch, ch, ft, fs))
        self.enc_mid = ResBlock(ch, ch)
        self.enc_out = CausalConv3d(ch, 2 * c.latent_channels)
        self.dec_in = CausalConv3d(c.latent_channels, ch)
        self.dec_mid = ResBlock(ch, ch)
        self.dec = nn.ModuleList()
        for ft, fs in reversed(c.factors):
            self.dec.append(DualUp(ch, ch, ft, fs))
            self.dec.append(ResBlock(ch, ch))
        self.dec_out = CausalConv3d(ch, 3)

    def _encode_chunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.enc_in(x)
        for m in self.enc:
            h = m(h)
        mean, logvar = self.enc_out(self.enc_mid(h)).chunk(2, dim=1)
        return mean, logvar.clamp(-20, 10)

    def _decode_chunk(self, z: torch.Tensor) -> torch.Tensor:
        h = self.dec_mid(self.dec_in(z))
        for m in self.dec:
            h = m(h)
        return self.dec_out(h)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mean, logvar)``; videos longer than a chunk are encoded chunk by chunk."""
        c = self.config
        if x.shape[-1] % c.spatial or x.shape[-2] % c.spatial:
            raise ValueError(f"H, W of {tuple(x.shape)} must be divisible by {c.spatial}")
        frames = x.shape[2]
        if frames <= c.chunk_frames:
            c.latent_frames(frames)
            return self._encode_chunk(x)
        if frames % c.chunk_frames:
            raise ValueError(
                f"{frames} frames: long videos must be whole chunks of {c.chunk_frames} frames"
            )
        parts = [self._encode_chunk(chunk) for chunk in x.split(c.chunk_frames, dim=2)]
        return torch.cat([m for m, _ in parts], 2), torch.cat([v for _, v in parts], 2)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents back to pixels, chunk by chunk like :meth:`encode`."""
        per_chunk = self.config.latent_frames(self.config.chunk_frames)
        if z.shape[2] <= per_chunk:
            return self._decode_chunk(z)
        return torch.cat([self._decode_chunk(p) for p in z.split(per_chunk, dim=2)], dim=2)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and the loss (MSE + kl_weight * KL per latent element)."""
        mean, logvar = self.encode(x)
        noise = torch.randn(mean.shape, generator=generator).to(mean)
        z = mean + (0.5 * logvar).exp() * noise
        recon = self.decode(z)
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
        return recon, F.mse_loss(recon, x) + self.config.kl_weight * kl


def psnr(recon: torch.Tensor, target: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for signals in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(recon.clamp(-1, 1), target).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))
