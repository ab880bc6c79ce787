"""The video DiT (Step-Video-T2V architecture) built from megatron-core ``ModuleSpec``s.

Reads top to bottom: patchify -> timestep embedding and adaLN-single -> N blocks of
(modulated self-attention with QK-norm and 3D RoPE, cross-attention to text, modulated GELU
MLP) -> final modulated LayerNorm and linear -> unpatchify. ``dit_layer_spec`` names every
part, so the same block takes the CPU core attention, a context-parallel one, or other
linears (e.g. Transformer-Engine's) without touching this file.

The model is three stages, each callable on its own (what pipeline parallelism cuts along):
``embed`` (patch embedding and the :class:`Conditioning` every block needs), ``layers`` (the
blocks) and ``head`` (final layer); ``forward`` only chains them between patchify and
unpatchify. Parallelism, following torchtitan's model / parallelize split: tensor parallelism
is in the block's ModuleSpec, whose linears and core attention are chosen from the
:class:`ParallelGroups` passed in (never from global ``torch.distributed`` state); splitting
the token sequence for context and sequence parallelism, and gathering it back, is done
around the stages by :func:`step_infra.models.parallelize.parallelize`, not here.
``build_dit`` does both and initializes the weights from a local generator.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn

from step_infra.models.attention import (
    CrossAttention,
    CrossAttentionSubmodules,
    LocalAttention,
    RingAttention,
    SelfAttention,
    SelfAttentionSubmodules,
    UlyssesAttention,
)
from step_infra.models.config import DiTConfig, dit_parameter_count, get_preset
from step_infra.models.layers import (
    MLP,
    LocalLinear,
    LongTextProjection,
    MLPSubmodules,
    TimestepEmbedding,
    init_torch_linear_,
    pack_text,
)
from step_infra.models.parallel import ParallelGroups
from step_infra.models.parallelize import parallelize
from step_infra.models.rope import rope_angles, rope_cos_sin
from step_infra.models.sequence_parallel import (
    SequenceParallelColumnLinear,
    SequenceParallelRowLinear,
)

log = logging.getLogger(__name__)

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin, each (S, 1, 1, head_dim)


def dit_layer_spec(groups: ParallelGroups) -> ModuleSpec:
    """The block's parts, chosen from ``groups``: megatron-core's parallel linears when the
    tensor-parallel group has several ranks, the sequence-parallel ones
    (:mod:`~step_infra.models.sequence_parallel`) with sequence parallelism, and the
    context-parallel core attention.

    With sequence parallelism the video tokens' linears gather the sequence on the way in and
    reduce-scatter it on the way out; the cross-attention's ``linear_kv`` reads the text,
    which every rank holds whole, so it stays megatron's column linear (its input gradient
    all-reduced over the TP group)."""
    tensor_parallel = groups.tp_size > 1
    column: type = ColumnParallelLinear if tensor_parallel else LocalLinear
    row: type = RowParallelLinear if tensor_parallel else LocalLinear
    text_column = column
    if groups.sequence_parallel:
        column, row = SequenceParallelColumnLinear, SequenceParallelRowLinear
    core: type = LocalAttention
    if groups.cp_size > 1:
        core = UlyssesAttention if groups.cp_kind == "ulysses" else RingAttention
    return ModuleSpec(
        module=DiTLayer,
        submodules={
            "self_attention": ModuleSpec(
                module=SelfAttention,
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column,
                    q_norm=nn.RMSNorm,
                    k_norm=nn.RMSNorm,
                    core_attention=core,
                    linear_proj=row,
                ),
            ),
            "cross_attention": ModuleSpec(
                module=CrossAttention,
                submodules=CrossAttentionSubmodules(
                    linear_q=column,
                    linear_kv=text_column,
                    q_norm=nn.RMSNorm,
                    k_norm=nn.RMSNorm,
                    core_attention=LocalAttention,
                    linear_proj=row,
                ),
            ),
            "mlp": ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row),
            ),
        },
    )


class DiTLayer(nn.Module):
    """One block: adaLN-modulated self-attention and MLP, unmodulated cross-attention."""

    def __init__(
        self,
        submodules: dict[str, ModuleSpec],
        *,
        config: DiTConfig,
        mcore_config: ModelParallelConfig,
        groups: ParallelGroups,
    ) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.norm_eps
        self.groups = groups
        self.norm1 = nn.LayerNorm(h, eps=eps, elementwise_affine=False)
        self.self_attention = build_module(
            submodules["self_attention"],
            mcore_config=mcore_config,
            num_heads=config.num_heads,
            head_dim=config.head_dim,
            eps=eps,
            groups=groups,
        )
        self.norm2 = nn.LayerNorm(h, eps=eps)
        self.cross_attention = build_module(
            submodules["cross_attention"],
            mcore_config=mcore_config,
            text_config=mcore_config,
            num_heads=config.num_heads,
            head_dim=config.head_dim,
            eps=eps,
            groups=groups,
        )
        self.norm3 = nn.LayerNorm(h, eps=eps, elementwise_affine=False)
        self.mlp = build_module(
            submodules["mlp"],
            mcore_config=mcore_config,
            ffn_hidden_size=config.ffn_hidden_size,
            groups=groups,
        )
        self.scale_shift_table = nn.Parameter(torch.randn(6, h) / h**0.5)
        if groups.sequence_parallel:  # used on this rank's sequence shard only
            for p in (*self.norm2.parameters(), self.scale_shift_table):
                p.tp_partial_grad = True  # type: ignore[attr-defined]

    def init_weights(self, generator: torch.Generator, *, std: float, out_std: float) -> None:
        self.norm2.reset_parameters()
        self.self_attention.init_weights(generator, std=std, out_std=out_std)
        self.cross_attention.init_weights(generator, std=std, out_std=out_std)
        self.mlp.init_weights(generator, std=std, out_std=out_std)
        h = self.scale_shift_table.shape[1]
        nn.init.normal_(self.scale_shift_table, 0.0, h**-0.5, generator=generator)

    def forward(
        self,
        x: torch.Tensor,  # (S, B, h), S = this rank's tokens (its 1/tp slice with SP)
        t_mod: torch.Tensor,  # (B, 6, h)
        text: torch.Tensor,  # (L, B, h)
        text_lengths: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],  # of this CP rank's tokens (all TP slices)
    ) -> torch.Tensor:
        # The sublayers take and return x's layout; with sequence parallelism their first
        # linear all-gathers the TP slices and their last reduce-scatters them back.
        mod = (self.scale_shift_table[None] + t_mod).unsqueeze(0)  # (1, B, 6, h)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(2)
        y = self.norm1(x) * (1 + scale1) + shift1
        x = x + gate1 * self.self_attention(y, rope)
        x = x + self.cross_attention(self.norm2(x), text, text_lengths)
        y = self.norm3(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(y)


@dataclass(slots=True)
class Conditioning:
    """What the blocks and the head need besides the hidden states; ``DiT.embed`` makes it."""

    t_mod: torch.Tensor  # (B, 6, h) adaLN-single modulation, shared by all blocks
    temb: torch.Tensor  # (B, h) timestep embedding, modulates the head
    text: torch.Tensor  # (L, B, h) both captions' tokens, valid ones first
    text_lengths: torch.Tensor  # (B,)
    rope: Rope  # angles of the tokens the hidden states hold


class DiTEmbedding(nn.Module):
    """Patch embedding of the tokens, timestep and caption conditioning."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        c, h = config, config.hidden_size
        self.patch_embed = nn.Linear(c.in_channels * c.patch_size**2, h)
        self.timestep = TimestepEmbedding(c.timestep_channels, h)
        self.adaln = nn.Linear(h, 6 * h)  # adaLN-single, shared by all blocks
        self.text_short = nn.Linear(c.text_dim_short, h)
        self.text_long = LongTextProjection(c.text_dim_long, h)

    def init_weights(self, generator: torch.Generator) -> None:
        for m in self.modules():  # registration order: the same draws on every rank
            if isinstance(m, nn.Linear):
                init_torch_linear_(m, generator)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()

    def forward(
        self,
        tokens: torch.Tensor,  # (B, S, C p p) patches
        rope: Rope,  # of those S tokens
        t: torch.Tensor,  # (B,) in [0, 1]
        text_short: torch.Tensor,  # (B, Ls, text_dim_short)
        short_lengths: torch.Tensor | None = None,  # (B,)
        text_long: torch.Tensor | None = None,  # (B, Ll, text_dim_long)
        long_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Conditioning]:
        b = tokens.shape[0]
        h = self.patch_embed(tokens).transpose(0, 1)  # (S, B, h)
        temb = self.timestep(t)  # (B, h)
        t_mod = self.adaln(nn.functional.silu(temb)).view(b, 6, -1)  # (B, 6, h)
        if short_lengths is None:
            short_lengths = torch.full((b,), text_short.shape[1], device=tokens.device)
        short = self.text_short(text_short)
        long = self.text_long(text_long) if text_long is not None else None
        if long is not None and long_lengths is None:
            long_lengths = torch.full((b,), long.shape[1], device=tokens.device)
        text, text_lengths = pack_text(short, short_lengths, long, long_lengths)
        return h, Conditioning(t_mod, temb, text.transpose(0, 1), text_lengths, rope)


class DiTHead(nn.Module):
    """Final layer: LayerNorm modulated by the timestep embedding, then a linear to patches."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        c, h = config, config.hidden_size
        self.final_norm = nn.LayerNorm(h, eps=c.norm_eps, elementwise_affine=False)
        self.final_table = nn.Parameter(torch.randn(2, h) / h**0.5)
        self.final_linear = nn.Linear(h, c.out_channels * c.patch_size**2)

    def init_weights(self, generator: torch.Generator) -> None:
        h = self.final_table.shape[1]
        nn.init.normal_(self.final_table, 0.0, h**-0.5, generator=generator)
        init_torch_linear_(self.final_linear, generator)

    def forward(
        self,
        x: torch.Tensor,  # (S, B, h)
        temb: torch.Tensor,  # (B, h)
    ) -> torch.Tensor:  # (S, B, C p p)
        shift, scale = (self.final_table[None] + temb[:, None]).unsqueeze(0).unbind(2)
        return self.final_linear(self.final_norm(x) * (1 + scale) + shift)  # type: ignore[no-any-return]


class DiT(nn.Module):
    """Video diffusion transformer: ``(latents, t, text) -> velocity`` of the same shape.

    ``groups`` chooses the blocks' tensor- and context-parallel parts; without it the model is
    the plain one-process DiT and never calls ``torch.distributed``. The weights are those of
    torch's and megatron-core's defaults (global RNG); ``init_weights`` draws them from a
    generator instead, which is what ``build_dit`` does.
    """

    def __init__(self, config: DiTConfig, groups: ParallelGroups | None = None) -> None:
        super().__init__()
        self.config = c = config
        self.groups = groups = groups or ParallelGroups.single()
        std, out_std = c.init_std, self.output_init_std
        mcore = ModelParallelConfig(
            use_cpu_initialization=True,  # init the full weight, then keep this rank's slice
            perform_initialization=True,  # also marks the TP weights (``partition_dim``, ...)
            params_dtype=torch.float32,
            sequence_parallel=False,  # the SP linears are our own: see `sequence_parallel`
        )
        mcore.hidden_size = c.hidden_size  # type: ignore[attr-defined]
        mcore.init_method = lambda w: nn.init.normal_(w, 0.0, std)  # type: ignore[attr-defined]
        mcore.output_layer_init_method = lambda w: nn.init.normal_(w, 0.0, out_std)  # type: ignore[attr-defined]
        self.embed = DiTEmbedding(c)
        spec = dit_layer_spec(groups)
        self.layers = nn.ModuleList(
            build_module(spec, config=c, mcore_config=mcore, groups=groups)
            for _ in range(c.num_layers)
        )
        self.head = DiTHead(c)
        if c.zero_init_output:
            self._zero_init()

    @property
    def output_init_std(self) -> float:
        """Std of the blocks' output projections: ``init_std / sqrt(2 * num_layers)``."""
        return self.config.init_std / (2 * self.config.num_layers) ** 0.5

    def init_weights(self, generator: torch.Generator) -> None:
        """Draw every parameter from ``generator`` (CPU), stage by stage in a fixed order.

        Tensor-parallel weights are drawn full and sliced, so the same generator state gives
        the same full model on every rank of any layout.
        """
        std, out_std = self.config.init_std, self.output_init_std
        self.embed.init_weights(generator)
        for layer in self.layers:
            assert isinstance(layer, DiTLayer)
            layer.init_weights(generator, std=std, out_std=out_std)
        self.head.init_weights(generator)
        if self.config.zero_init_output:
            self._zero_init()

    def _zero_init(self) -> None:
        """adaLN-zero start: blocks begin as identity, the output as zero."""
        for p in (*self.embed.adaln.parameters(), *self.head.final_linear.parameters()):
            nn.init.zeros_(p)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, Rope, tuple[int, int, int]]:
        """Latents ``(B, C, F, H, W)`` -> tokens ``(B, S, C p p)``, their RoPE and the grid."""
        c, p = self.config, self.config.patch_size
        _, ch, f, hh, ww = x.shape
        if ch != c.in_channels or hh % p or ww % p:
            raise ValueError(
                f"latents {tuple(x.shape)} need {c.in_channels} channels and H, W divisible by {p}"
            )
        grid = (f, hh // p, ww // p)
        rope = rope_cos_sin(rope_angles(grid, c.rope_split, c.rope_base).to(x.device))
        return _patchify(x, p), rope, grid

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Head output ``(S, B, C p p)`` -> ``(B, C, F, H, W)``."""
        c = self.config
        return _unpatchify(out.transpose(0, 1), grid, c.patch_size, c.out_channels)

    def forward(
        self,
        x: torch.Tensor,  # (B, C, F, H, W) latents
        t: torch.Tensor,  # (B,) in [0, 1]
        text_short: torch.Tensor,  # (B, Ls, text_dim_short)
        short_lengths: torch.Tensor | None = None,  # (B,)
        text_long: torch.Tensor | None = None,  # (B, Ll, text_dim_long)
        long_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        tokens, rope, grid = self.patchify(x)  # (B, S, C p p)
        h, cond = self.embed(tokens, rope, t, text_short, short_lengths, text_long, long_lengths)
        for layer in self.layers:  # h: (S, B, h)
            h = layer(h, cond.t_mod, cond.text, cond.text_lengths, cond.rope)
        return self.unpatchify(self.head(h, cond.temb), grid)


def _patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, F, H, W] -> [B, F * H/p * W/p, C p p]`` in (f, h, w) raster order."""
    b, c, f, h, w = x.shape
    x = x.view(b, c, f, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)
    return x.reshape(b, f * (h // p) * (w // p), c * p * p)


def _unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], p: int, c: int) -> torch.Tensor:
    b = tokens.shape[0]
    f, gh, gw = grid
    x = tokens.reshape(b, f, gh, gw, c, p, p).permute(0, 4, 1, 2, 5, 3, 6)
    return x.reshape(b, c, f, gh * p, gw * p)


def _materialize(model: nn.Module, device: str | torch.device) -> None:
    """``to_empty`` that keeps the attributes megatron-core and ``parallel`` set on parameters
    (``tensor_model_parallel``, ``partition_dim``, ``tp_partial_grad``, ...): a meta
    parameter is replaced by a new ``Parameter`` object, which would drop them."""
    marks = {name: dict(vars(p)) for name, p in model.named_parameters()}
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        vars(p).update(marks[name])


def build_dit(
    preset_or_config: str | DiTConfig,
    *,
    groups: ParallelGroups | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> DiT:
    """Build the DiT. ``device="meta"`` allocates nothing (for counting the 30B model).

    The modules are built on the meta device and their weights drawn once on the CPU from a
    local ``torch.Generator`` seeded with ``seed`` (the global RNG is neither used nor
    reseeded). The same ``seed`` gives the same full weights whatever the parallel layout:
    every rank draws the full tensors and keeps its slice. With ``groups``, the model is
    also :func:`~step_infra.models.parallelize.parallelize`-d for them.
    """
    config = get_preset(preset_or_config)
    with torch.device("meta"):
        model = DiT(config, groups)
    if device is None or torch.device(device).type != "meta":
        _materialize(model, "cpu")
        model.init_weights(torch.Generator().manual_seed(seed))
        if device is not None:
            model = model.to(device)
    if (groups is None or groups.tp_size == 1) and model.num_parameters() != dit_parameter_count(
        config
    ):
        raise AssertionError("parameter formula and module disagree; fix dit_parameter_count")
    if groups is not None:
        parallelize(model, groups)
    log.info("built DiT with %.3fB parameters", model.num_parameters() / 1e9)
    return model
