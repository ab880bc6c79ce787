"""Procedurally rendered clips of one shape moving in one of four directions, with captions.

Why synthetic: on a CPU there is no room for real video, yet the recipes need a signal a
tiny model can learn and a check that can fail. A coloured shape sliding left/right/up/down
gives both: the caption ("a red circle moves left" / "一个红色的圆形向左移动") fixes the
direction, and :mod:`step_infra.data.motion` reads the direction back from pixels.

Every clip is a pure function of ``(seed, index)``: the same data set on every rank and run.
Videos are ``[channels=3, frames, height, width]`` float32 in ``[-1, 1]`` (black background).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 1.0, 0.1),
    "blue": (0.2, 0.3, 1.0),
    "yellow": (1.0, 1.0, 0.1),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
# (dx, dy) in pixels per unit of travel; y grows downwards as in images.
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
ZH_COLORS = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"}
ZH_SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
ZH_DIRECTIONS = {"left": "向左", "right": "向右", "up": "向上", "down": "向下"}


@dataclass(frozen=True, slots=True, kw_only=True)
class ClipSpec:
    """What one clip shows."""

    color: str
    shape: str
    direction: str
    start_xy: tuple[float, float]
    radius: float
    travel: float

    def caption(self, lang: str = "en") -> str:
        if lang == "en":
            return f"a {self.color} {self.shape} moves {self.direction}"
        if lang == "zh":
            c, s, d = (
                ZH_COLORS[self.color],
                ZH_SHAPES[self.shape],
                ZH_DIRECTIONS[self.direction],
            )
            return f"一个{c}的{s}{d}移动"
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SyntheticConfig:
    """Size and randomness of the synthetic clip set."""

    num_clips: int = 1024
    frames: int = 8
    height: int = 16
    width: int = 16
    seed: int = 0
    radius_range: tuple[float, float] = (2.0, 3.0)
    travel_fraction: float = 0.45  # of the frame size, over the whole clip
    directions: tuple[str, ...] = DIRECTIONS

    def __post_init__(self) -> None:
        if self.frames < 2:
            raise ValueError(f"frames must be >= 2 so that something can move, got {self.frames}")
        if min(self.height, self.width) < 8:
            raise ValueError(
                f"height and width must be >= 8 pixels, got {self.height}x{self.width}"
            )
        bad = [d for d in self.directions if d not in DIRECTIONS]
        if bad:
            raise ValueError(f"unknown directions {bad}; expected a subset of {DIRECTIONS}")


def clip_spec(config: SyntheticConfig, index: int) -> ClipSpec:
    """The deterministic content of clip ``index``."""
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
    pick = lambda n: int(torch.randint(n, (1,), generator=g))  # noqa: E731
    color = list(COLORS)[pick(len(COLORS))]
    shape = SHAPES[pick(len(SHAPES))]
    direction = config.directions[pick(len(config.directions))]
    lo, hi = config.radius_range
    radius = lo + (hi - lo) * float(torch.rand((), generator=g))
    travel = config.travel_fraction * min(config.height, config.width)
    dx, dy = DIRECTION_VECTORS[direction]
    # Start so that the whole path stays inside the frame.
    margin = radius + 0.5

    def start(size: int, d: int) -> float:
        lo_s = margin + (travel if d < 0 else 0.0)
        hi_s = size - 1 - margin - (travel if d > 0 else 0.0)
        return lo_s + (hi_s - lo_s) * float(torch.rand((), generator=g))

    return ClipSpec(
        color=color,
        shape=shape,
        direction=direction,
        start_xy=(start(config.width, dx), start(config.height, dy)),
        radius=radius,
        travel=travel,
    )


def render(spec: ClipSpec, *, frames: int, height: int, width: int) -> torch.Tensor:
    """Render ``spec`` to a ``[3, frames, height, width]`` clip in ``[-1, 1]``."""
    ys = torch.arange(height, dtype=torch.float32)[:, None]
    xs = torch.arange(width, dtype=torch.float32)[None, :]
    dx, dy = DIRECTION_VECTORS[spec.direction]
    color = torch.tensor(COLORS[spec.color])[:, None, None]
    out = torch.full((3, frames, height, width), -1.0)
    for f in range(frames):
        step = spec.travel * f / (frames - 1)
        cx, cy = spec.start_xy[0] + dx * step, spec.start_xy[1] + dy * step
        mask = _shape_mask(spec.shape, xs - cx, ys - cy, spec.radius)
        out[:, f] = torch.where(mask, color * 2 - 1, out[:, f])
    return out


def _shape_mask(shape: str, x: torch.Tensor, y: torch.Tensor, r: float) -> torch.Tensor:
    if shape == "circle":
        return x**2 + y**2 <= r**2
    if shape == "square":
        return (x.abs() <= r * 0.85) & (y.abs() <= r * 0.85)
    if shape == "triangle":  # apex up, base at y = +r
        return (y <= r) & (y >= -r) & (x.abs() <= (y + r) / 2)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


class SyntheticClips(torch.utils.data.Dataset[dict[str, object]]):
    """Map-style data set of synthetic clips; item ``i`` is the same on every call."""

    def __init__(self, config: SyntheticConfig | None = None) -> None:
        self.config = config or SyntheticConfig()

    def __len__(self) -> int:
        return self.config.num_clips

    def __getitem__(self, index: int) -> dict[str, object]:
        if not 0 <= index < len(self):
            raise IndexError(f"clip index {index} outside 0..{len(self) - 1}")
        c = self.config
        spec = clip_spec(c, index)
        video = render(spec, frames=c.frames, height=c.height, width=c.width)
        return {
            "video": video,
            "caption_en": spec.caption("en"),
            "caption_zh": spec.caption("zh"),
            "direction": spec.direction,
            "index": index,
        }

    def batch(self, indices: list[int]) -> dict[str, object]:
        """Stack items ``indices`` into one batch (videos ``[B, 3, F, H, W]``)."""
        items = [self[i] for i in indices]
        return {
            "video": torch.stack([it["video"] for it in items]),  # type: ignore[misc]
            "caption_en": [it["caption_en"] for it in items],
            "caption_zh": [it["caption_zh"] for it in items],
            "direction": [it["direction"] for it in items],
            "index": indices,
        }


def eval_captions(n: int, lang: str = "en") -> list[str]:
    """``n`` captions cycling over every colour x shape x direction (direction fastest, so a
    few prompts already cover every direction); ``lang`` "en", "zh" or "both" (alternating)."""
    if lang not in ("en", "zh", "both"):
        raise ValueError(f"lang {lang!r}; expected 'en', 'zh' or 'both'")
    combos = [(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]
    out = []
    for i in range(n):
        c, s, d = combos[i % len(combos)]
        spec = ClipSpec(color=c, shape=s, direction=d, start_xy=(0, 0), radius=1, travel=1)
        out.append(spec.caption(("en", "zh")[i % 2] if lang == "both" else lang))
    return out
