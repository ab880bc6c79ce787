"""The video DiT (Step-Video-T2V architecture) built from megatron-core ``ModuleSpec``s.

Reads top to bottom: patchify -> timestep embedding and adaLN-single -> N blocks of
(modulated self-attention with QK-norm and 3D RoPE, cross-attention to text, modulated GELU
MLP) -> final modulated LayerNorm and linear -> unpatchify. ``dit_layer_spec`` names every
part, so the same block takes the CPU core attention, a context-parallel one, or other
linears (e.g. Transformer-Engine's) without touching this file.

Parallelism: TP through megatron-core's column/row-parallel linears; sequence parallel (SP)
and context parallel (CP) by splitting the token sequence (see ``parallel``). With CP each
rank keeps a contiguous chunk of the tokens; with SP the chunk is split again across the
TP ranks between attention and MLP. The output is gathered back to the full sequence, so
every rank returns the same ``[B, C, F, H, W]`` prediction.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn

from step_infra.models import parallel
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
    pack_text,
)
from step_infra.models.parallel import ParallelGroups
from step_infra.models.rope import rope_angles, rope_cos_sin

log = logging.getLogger(__name__)


def dit_layer_spec(groups: ParallelGroups) -> ModuleSpec:
    """The block's parts; the self-attention core follows the context-parallel choice."""
    core: type = LocalAttention
    column: type = ColumnParallelLinear if dist.is_initialized() else LocalLinear
    row: type = RowParallelLinear if dist.is_initialized() else LocalLinear
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
                    linear_kv=column,
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

    def _sublayer(self, fn: Any, x: torch.Tensor, *args: Any) -> torch.Tensor:
        if not self.groups.sequence_parallel:
            return fn(x, *args)  # type: ignore[no-any-return]
        full = parallel.gather(x, self.groups.tp, dim=0, reduce_grad=True)
        return parallel.scatter(fn(full, *args), self.groups.tp, dim=0)

    def forward(
        self,
        x: torch.Tensor,  # (S, B, h), S = this rank's tokens
        t_mod: torch.Tensor,  # (B, 6, h)
        text: torch.Tensor,  # (L, B, h)
        text_lengths: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        mod = (self.scale_shift_table[None] + t_mod).unsqueeze(0)  # (1, B, 6, h)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(2)
        y = self.norm1(x) * (1 + scale1) + shift1
        x = x + gate1 * self._sublayer(self.self_attention, y, rope)
        x = x + self._sublayer(self.cross_attention, self.norm2(x), text, text_lengths)
        y = self.norm3(x) * (1 + scale2) + shift2
        return x + gate2 * self._sublayer(self.mlp, y)


class DiT(nn.Module):
    """Video diffusion transformer: ``(latents, t, text) -> velocity`` of the same shape."""

    def __init__(self, config: DiTConfig, groups: ParallelGroups | None = None) -> None:
        super().__init__()
        self.config = c = config
        self.groups = groups = groups or ParallelGroups.single()
        h, p = c.hidden_size, c.patch_size
        std = c.init_std
        mcore = ModelParallelConfig(
            use_cpu_initialization=True,  # init the full weight, then keep this rank's slice
            perform_initialization=True,
            params_dtype=torch.float32,
            sequence_parallel=False,  # handled around the linears; see `parallel`
        )
        mcore.hidden_size = h  # type: ignore[attr-defined]
        mcore.init_method = lambda w: nn.init.normal_(w, 0.0, std)  # type: ignore[attr-defined]
        mcore.output_layer_init_method = lambda w: nn.init.normal_(  # type: ignore[attr-defined]
            w, 0.0, std / (2 * c.num_layers) ** 0.5
        )
        self.patch_embed = nn.Linear(c.in_channels * p * p, h)
        self.timestep = TimestepEmbedding(c.timestep_channels, h)
        self.adaln = nn.Linear(h, 6 * h)  # adaLN-single, shared by all blocks
        self.text_short = nn.Linear(c.text_dim_short, h)
        self.text_long = LongTextProjection(c.text_dim_long, h)
        spec = dit_layer_spec(groups)
        self.layers = nn.ModuleList(
            build_module(spec, config=c, mcore_config=mcore, groups=groups)
            for _ in range(c.num_layers)
        )
        self.final_norm = nn.LayerNorm(h, eps=c.norm_eps, elementwise_affine=False)
        self.final_table = nn.Parameter(torch.randn(2, h) / h**0.5)
        self.final_linear = nn.Linear(h, c.out_channels * p * p)
        if groups.sequence_parallel:
            for prm in (self.final_table, *self.final_linear.parameters()):
                prm.tp_partial_grad = True  # type: ignore[attr-defined]
        if c.zero_init_output:  # adaLN-zero start: blocks begin as identity, the output as zero
            self._zero_init()

    def _zero_init(self) -> None:
        nn.init.zeros_(self.adaln.weight)
        nn.init.zeros_(self.adaln.bias)
        nn.init.zeros_(self.final_linear.weight)
        nn.init.zeros_(self.final_linear.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        x: torch.Tensor,  # (B, C, F, H, W) latents
        t: torch.Tensor,  # (B,) in [0, 1]
        text_short: torch.Tensor,  # (B, Ls, text_dim_short)
        short_lengths: torch.Tensor | None = None,  # (B,)
        text_long: torch.Tensor | None = None,  # (B, Ll, text_dim_long)
        long_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        c, g = self.config, self.groups
        b, ch, f, hh, ww = x.shape
        p = c.patch_size
        if ch != c.in_channels or hh % p or ww % p:
            raise ValueError(
                f"latents {tuple(x.shape)} need {c.in_channels} channels and H, W divisible by {p}"
            )
        grid = (f, hh // p, ww // p)
        tokens = _patchify(x, p)  # (B, S, C p p)
        seq = tokens.shape[1]
        split = g.cp_size * (g.tp_size if g.sequence_parallel else 1)
        if seq % split:
            raise ValueError(f"{seq} tokens do not split evenly over cp x sp = {split} ranks")
        cos, sin = rope_cos_sin(rope_angles(grid, c.rope_split, c.rope_base).to(x.device))
        if g.cp_size > 1:  # this rank's contiguous chunk; gradients stay partial (summed later)
            tokens = tokens.chunk(g.cp_size, dim=1)[g.cp_rank]
            cos, sin = cos.chunk(g.cp_size)[g.cp_rank], sin.chunk(g.cp_size)[g.cp_rank]
        h = self.patch_embed(tokens).transpose(0, 1)  # (S_local, B, h)

        temb = self.timestep(t)  # (B, h)
        t_mod = self.adaln(nn.functional.silu(temb)).view(b, 6, -1)  # (B, 6, h)
        if short_lengths is None:
            short_lengths = torch.full((b,), text_short.shape[1], device=x.device)
        short = self.text_short(text_short)
        long = self.text_long(text_long) if text_long is not None else None
        if long is not None and long_lengths is None:
            long_lengths = torch.full((b,), long.shape[1], device=x.device)
        text, text_lengths = pack_text(short, short_lengths, long, long_lengths)
        text = text.transpose(0, 1)  # (L, B, h)

        if g.sequence_parallel:
            h = parallel.scatter(h, g.tp, dim=0)
            t_mod = parallel.all_reduce_grad(t_mod, g.tp)
            temb = parallel.all_reduce_grad(temb, g.tp)
        for layer in self.layers:
            h = layer(h, t_mod, text, text_lengths, (cos, sin))

        shift, scale = (self.final_table[None] + temb[:, None]).unsqueeze(0).unbind(2)
        out = self.final_linear(self.final_norm(h) * (1 + scale) + shift)  # (S_local, B, C p p)
        if g.sequence_parallel:
            out = parallel.gather(out, g.tp, dim=0, reduce_grad=False)
        if g.cp_size > 1:
            out = parallel.gather(out, g.cp, dim=0, reduce_grad=False)
        return _unpatchify(out.transpose(0, 1), grid, p, c.out_channels)


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


def build_dit(
    preset_or_config: str | DiTConfig,
    *,
    groups: ParallelGroups | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> DiT:
    """Build the DiT. ``device="meta"`` allocates nothing (for counting the 30B model).

    The same ``seed`` gives the same full weights whatever the parallel layout: every rank
    draws the full tensor on the CPU and keeps its slice.
    """
    config = get_preset(preset_or_config)
    torch.manual_seed(seed)
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            model = DiT(config, groups)
    else:
        model = DiT(config, groups)
        if device is not None:
            model = model.to(device)
    if (groups is None or groups.tp_size == 1) and model.num_parameters() != dit_parameter_count(
        config
    ):
        raise AssertionError("parameter formula and module disagree; fix dit_parameter_count")
    log.info("built DiT with %.3fB parameters", model.num_parameters() / 1e9)
    return model
