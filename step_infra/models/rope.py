"""3D rotary position embedding over (frame, height, width) latent positions.

The head dimension is split (``rope_split``, e.g. [64, 32, 32]) between the three axes; each
share rotates by its own axis' position with the usual ``base ** (-2i / d)`` frequencies.
Pairs are formed the "rotate half" way (channel ``i`` with ``i + d/2``), as megatron-core
does; that is a fixed permutation of the interleaved form, so attention scores are the same.
"""

from __future__ import annotations

import torch


def rope_angles(
    grid: tuple[int, int, int], split: tuple[int, int, int], base: float = 10_000.0
) -> torch.Tensor:
    """Angles ``[frames * height * width, head_dim / 2]`` for tokens in (f, h, w) raster order."""
    axes = []
    for size, dim in zip(grid, split, strict=True):
        inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        axes.append(torch.arange(size, dtype=torch.float64)[:, None] * inv[None, :])
    f, h, w = grid
    af = axes[0][:, None, None, :].expand(f, h, w, -1)
    ah = axes[1][None, :, None, :].expand(f, h, w, -1)
    aw = axes[2][None, None, :, :].expand(f, h, w, -1)
    return torch.cat([af, ah, aw], dim=-1).reshape(f * h * w, -1).float()


def rope_cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[seq, 1, 1, head_dim]`` for ``[seq, batch, heads, head_dim]`` tensors."""
    full = torch.cat([angles, angles], dim=-1)[:, None, None, :]
    return full.cos(), full.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[seq, batch, heads, head_dim]`` by the given angles."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
