"""DiT shapes and named presets, and the parameter count derived from the shapes alone.

``dit_parameter_count`` is the formula the planner (``step-infra plan --explain``) and
``build_dit`` both report; the test builds ``stepvideo-t2v-30b`` on the meta device and checks
that the module's real count equals it. Shapes follow shared/REFERENCE.md (Step-Video-T2V,
arXiv 2502.10248): 48 layers, hidden 6144, 48 heads x 128, FFN 24,576, 64 latent channels,
patch 1, text from a 1024-d short encoder and a 6144-d long encoder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class DiTConfig:
    """Shapes of the video DiT."""

    num_layers: int
    hidden_size: int
    num_heads: int
    head_dim: int
    ffn_hidden_size: int
    in_channels: int
    patch_size: int = 1
    rope_split: tuple[int, int, int] = (64, 32, 32)  # head-dim share of (frame, height, width)
    rope_base: float = 10_000.0
    timestep_channels: int = 256
    text_dim_short: int = 1024  # CLIP-style encoder
    text_dim_long: int = 6144  # LLM-style encoder
    norm_eps: float = 1e-6
    init_std: float = 0.02
    zero_init_output: bool = True  # adaLN-zero start; tests turn it off to see every gradient

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "head_dim", "in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if sum(self.rope_split) != self.head_dim or any(s % 2 for s in self.rope_split):
            raise ValueError(
                f"rope_split {self.rope_split} must be even numbers summing to head_dim {self.head_dim}"
            )

    @property
    def out_channels(self) -> int:
        return self.in_channels

    def replace(self, **changes: object) -> DiTConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


PRESETS: dict[str, DiTConfig] = {
    "stepvideo-t2v-30b": DiTConfig(
        num_layers=48,
        hidden_size=6144,
        num_heads=48,
        head_dim=128,
        ffn_hidden_size=24_576,
        in_channels=64,
    ),
    # Same shapes as the emulator's `tiny-dit` preset.
    "tiny-dit": DiTConfig(
        num_layers=4,
        hidden_size=128,
        num_heads=4,
        head_dim=32,
        ffn_hidden_size=512,
        in_channels=16,
        rope_split=(16, 8, 8),
        timestep_channels=64,
        text_dim_short=384,
        text_dim_long=128,
    ),
    # Smallest useful model for unit tests and parallel-equivalence tests.
    "micro-dit": DiTConfig(
        num_layers=2,
        hidden_size=32,
        num_heads=4,
        head_dim=8,
        ffn_hidden_size=64,
        in_channels=4,
        rope_split=(4, 2, 2),
        timestep_channels=16,
        text_dim_short=24,
        text_dim_long=16,
    ),
}


def get_preset(name_or_config: str | DiTConfig) -> DiTConfig:
    """A preset by name, or the config itself."""
    if isinstance(name_or_config, DiTConfig):
        return name_or_config
    if name_or_config not in PRESETS:
        raise ValueError(f"unknown DiT preset {name_or_config!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name_or_config]


def conditioned_preset(
    name_or_config: str | DiTConfig, *, latent_channels: int, text_dims: tuple[int, int]
) -> DiTConfig:
    """A preset sized for the VAE and text encoders it trains with: latent channels in and
    out, and the widths of the two text encoders' features (short, long). Every trainer
    (recipes, the streaming job) builds its DiT through this."""
    return get_preset(name_or_config).replace(
        in_channels=latent_channels, text_dim_short=text_dims[0], text_dim_long=text_dims[1]
    )


def dit_parameter_count(preset_or_config: str | DiTConfig) -> int:
    """Parameters of :class:`~step_infra.models.dit.DiT`, from the shapes alone.

    Per block: fused QKV (no bias), output projection (no bias), per-head RMSNorm on q and k
    in both attentions, cross-attention Q, KV and output projections (no bias) with an affine
    LayerNorm before it, GELU MLP with biases, and the 6 x hidden adaLN table. Outside the
    blocks: patch embedding, timestep MLP, the shared adaLN-single Linear(h -> 6h), both text
    projections, the final 2 x hidden table and output Linear.
    """
    c = get_preset(preset_or_config)
    h, a, f = c.hidden_size, c.num_heads * c.head_dim, c.ffn_hidden_size
    patch_in = c.in_channels * c.patch_size**2
    self_attn = h * 3 * a + a * h + 2 * c.head_dim
    cross_attn = h * a + h * 2 * a + a * h + 2 * c.head_dim + 2 * h
    mlp = h * f + f + f * h + h
    block = self_attn + cross_attn + mlp + 6 * h
    embed = patch_in * h + h
    timestep = c.timestep_channels * h + h + h * h + h
    adaln = h * 6 * h + 6 * h
    text_short = c.text_dim_short * h + h
    text_long = 2 * c.text_dim_long + c.text_dim_long * h + h + h * h + h
    final = 2 * h + h * patch_in + patch_in
    return c.num_layers * block + embed + timestep + adaln + text_short + text_long + final
