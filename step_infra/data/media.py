"""Write generated clips as animated GIFs (Pillow, which matplotlib already brings)."""

from __future__ import annotations

from pathlib import Path

import torch


def write_gif(video: torch.Tensor, path: str | Path, *, scale: int = 8, fps: int = 8) -> Path:
    """Save a ``[3, F, H, W]`` clip in ``[-1, 1]`` as a looping GIF, upscaled ``scale`` times."""
    from PIL import Image

    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be [3, frames, height, width], got {tuple(video.shape)}")
    pixels = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, F, H, W)
    frames = []
    for f in range(pixels.shape[1]):
        arr = pixels[:, f].permute(1, 2, 0).contiguous().numpy()
        img = Image.fromarray(arr, mode="RGB")
        frames.append(img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=1000 // fps, loop=0)
    return out
