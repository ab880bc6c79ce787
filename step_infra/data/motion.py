"""Motion check: read the moving shape's direction back from pixels and compare with a caption.

The default scorer of the preference tool and the acceptance metric of the recipes. It needs
no model: the brightness-weighted centroid of each frame is tracked, and the dominant axis and
sign of its displacement from the first half of the clip to the second half is the direction.
Chance level is 25% (four directions).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from step_infra.data.synthetic import DIRECTIONS, ZH_DIRECTIONS


def centroids(video: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """Per-frame ``(x, y)`` centroid ``[frames, 2]`` of pixels brighter than the background.

    ``video`` is ``[3, F, H, W]`` in ``[-1, 1]``; brightness is the max over channels mapped to
    ``[0, 1]``, the background is each frame's median brightness, and pixels more than
    ``threshold`` above it weigh by the excess (robust to a grey, blurry decoded background).
    Frames with nothing bright get the frame centre.
    """
    if video.dim() != 4:
        raise ValueError(
            f"video must be [channels, frames, height, width], got {tuple(video.shape)}"
        )
    level = (video.float().amax(0) + 1) / 2  # (F, H, W) brightness in [0, 1]
    background = level.flatten(1).median(dim=1).values[:, None, None]  # the shape is small
    bright = (level - background - threshold).clamp(min=0)
    _, h, w = bright.shape
    ys = torch.arange(h, dtype=torch.float32)[None, :, None]
    xs = torch.arange(w, dtype=torch.float32)[None, None, :]
    mass = bright.sum((1, 2))
    safe = mass.clamp(min=1e-6)
    cx = (bright * xs).sum((1, 2)) / safe
    cy = (bright * ys).sum((1, 2)) / safe
    empty = mass < 1e-6
    cx = torch.where(empty, torch.full_like(cx, (w - 1) / 2), cx)
    cy = torch.where(empty, torch.full_like(cy, (h - 1) / 2), cy)
    return torch.stack([cx, cy], dim=1)


def motion_vector(video: torch.Tensor) -> tuple[float, float]:
    """Centroid displacement ``(dx, dy)`` from the first half of the clip to the second."""
    c = centroids(video)
    half = c.shape[0] // 2
    d = c[half:].mean(0) - c[:half].mean(0)
    return float(d[0]), float(d[1])


def predicted_direction(video: torch.Tensor, min_pixels: float = 0.5) -> str | None:
    """``left``/``right``/``up``/``down``, or None when the shape barely moved."""
    dx, dy = motion_vector(video)
    if max(abs(dx), abs(dy)) < min_pixels:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def caption_direction(caption: str) -> str:
    """The direction a caption asks for (English or Chinese)."""
    for d in DIRECTIONS:
        if re.search(rf"\b{d}\b", caption) or ZH_DIRECTIONS[d] in caption:
            return d
    raise ValueError(f"caption {caption!r} names no direction among {DIRECTIONS}")


def motion_score(video: torch.Tensor, caption: str) -> float:
    """Pluggable-scorer signature: signed displacement along the asked direction (pixels).

    Higher is better; a clip moving the wrong way scores negative.
    """
    dx, dy = motion_vector(video)
    want = caption_direction(caption)
    return {"left": -dx, "right": dx, "up": -dy, "down": dy}[want]


def motion_accuracy(
    videos: torch.Tensor | Sequence[torch.Tensor], captions: Sequence[str]
) -> float:
    """Fraction of clips whose predicted direction matches their caption (chance: 0.25)."""
    if len(videos) != len(captions):
        raise ValueError(f"{len(videos)} videos but {len(captions)} captions")
    if len(captions) == 0:
        raise ValueError("motion_accuracy needs at least one clip")
    hits = sum(
        predicted_direction(v) == caption_direction(c)
        for v, c in zip(videos, captions, strict=True)
    )
    return hits / len(captions)
