"""Small pieces of the DiT outside attention: MLP, timestep embedding, text projections, and
the seeded initializers every part of the DiT uses (see ``DiT.init_weights``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn

from step_infra.models.parallel import ParallelGroups


@dataclass
class MLPSubmodules:
    linear_fc1: ModuleSpec | type
    linear_fc2: ModuleSpec | type


class MLP(nn.Module):
    """GELU (tanh) feed-forward, column- then row-parallel. With sequence parallelism it
    takes and returns this rank's sequence shard (the linears gather and reduce-scatter)."""

    def __init__(
        self,
        submodules: MLPSubmodules,
        *,
        mcore_config: Any,
        ffn_hidden_size: int,
        groups: ParallelGroups,
    ) -> None:
        super().__init__()
        h = mcore_config.hidden_size
        self.linear_fc1 = build_module(
            submodules.linear_fc1,
            h,
            ffn_hidden_size,
            config=mcore_config,
            init_method=mcore_config.init_method,
            bias=True,
            gather_output=False,
            tp_group=groups.tp,
        )
        self.linear_fc2 = build_module(
            submodules.linear_fc2,
            ffn_hidden_size,
            h,
            config=mcore_config,
            init_method=mcore_config.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=groups.tp,
        )

    def init_weights(self, generator: torch.Generator, *, std: float, out_std: float) -> None:
        init_parallel_linear_(self.linear_fc1, std, generator)
        init_parallel_linear_(self.linear_fc2, out_std, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.linear_fc1(x)
        y, _ = self.linear_fc2(F.gelu(y, approximate="tanh"))
        return y


def timestep_sinusoid(t: torch.Tensor, channels: int, max_period: float = 10_000.0) -> torch.Tensor:
    """``[B] -> [B, channels]`` sinusoidal embedding of ``t * 1000`` (t in [0, 1])."""
    half = channels // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = (t.float() * 1000)[:, None] * freqs[None, :].to(t.device)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """Sinusoid -> Linear -> SiLU -> Linear."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.channels = channels
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.fc2(
            F.silu(self.fc1(timestep_sinusoid(t, self.channels).to(self.fc1.weight.dtype)))
        )


class LongTextProjection(nn.Module):
    """LLM-style text features: LayerNorm, then a 2-layer GELU projection to the hidden size."""

    def __init__(self, text_dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(text_dim)
        self.fc1 = nn.Linear(text_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x)), approximate="tanh"))


def pack_text(
    short: torch.Tensor,
    short_lengths: torch.Tensor,
    long: torch.Tensor | None,
    long_lengths: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate two padded token sets so each sample's valid tokens come first.

    ``short`` ``[B, Ls, h]``, ``long`` ``[B, Ll, h]`` -> ``[B, Ls + Ll, h]`` and lengths, so a
    single ``kv_lengths`` mask covers both encoders' padding.
    """
    if long is None or long_lengths is None:
        return short, short_lengths
    b, ls, _ = short.shape
    ll = long.shape[1]
    tokens = torch.cat([short, long], dim=1)
    pos = torch.arange(ls + ll, device=short.device)[None, :].expand(b, -1)
    valid = torch.cat(
        [pos[:, :ls] < short_lengths[:, None], pos[:, ls:] - ls < long_lengths[:, None]], dim=1
    )
    order = torch.argsort((~valid).to(torch.int8) * (ls + ll) + pos, dim=1)
    packed = torch.gather(tokens, 1, order[..., None].expand(-1, -1, tokens.shape[-1]))
    return packed, short_lengths + long_lengths


class LocalLinear(nn.Module):
    """Stand-in for megatron-core's parallel linears (same signature, same parameter names and
    initialization) when the tensor-parallel group has one rank: it needs no
    ``torch.distributed``, whereas megatron-core's row-parallel linear wants a real group to
    reduce over even then."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: Any,
        init_method: Any,
        bias: bool = True,
        **_parallel_options: Any,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))
        if config.perform_initialization:
            # Same draw as megatron-core's CPU initialization of the full (master) weight.
            master = torch.empty(output_size, input_size, dtype=torch.float)
            init_method(master)
            with torch.no_grad():
                self.weight.copy_(master)
        self.bias = (
            nn.Parameter(torch.zeros(output_size, dtype=config.params_dtype)) if bias else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.linear(x, self.weight, self.bias), None


def init_torch_linear_(linear: nn.Linear, generator: torch.Generator) -> None:
    """``nn.Linear``'s own initialization, drawn from ``generator``: weight and bias uniform in
    ``+-1/sqrt(fan_in)`` (``kaiming_uniform_(a=sqrt(5))`` reduces to that bound)."""
    bound = 1 / math.sqrt(linear.in_features)
    nn.init.uniform_(linear.weight, -bound, bound, generator=generator)
    if linear.bias is not None:
        nn.init.uniform_(linear.bias, -bound, bound, generator=generator)


def init_parallel_linear_(linear: nn.Module, std: float, generator: torch.Generator) -> None:
    """Normal(0, ``std``) weight and zero bias for :class:`LocalLinear` and megatron-core's
    column/row-parallel linears alike.

    As megatron-core's CPU initialization does, the full (master) weight is drawn and this rank
    keeps its slice along the weight's ``partition_dim``; so one generator state gives the same
    full weight whatever the tensor-parallel size.
    """
    weight = linear.weight
    assert isinstance(weight, torch.Tensor)
    full, dim, rank, size = list(weight.shape), 0, 0, 1
    if getattr(weight, "tensor_model_parallel", False):
        dim = int(weight.partition_dim)  # type: ignore[attr-defined]
        group: Any = linear.tp_group  # megatron-core's linears keep their group
        rank, size = int(group.rank()), int(group.size())
        full[dim] *= size
    master = torch.empty(full, dtype=torch.float32).normal_(0.0, std, generator=generator)
    with torch.no_grad():
        weight.copy_(master.chunk(size, dim=dim)[rank])
        if isinstance(linear.bias, torch.Tensor):
            linear.bias.zero_()
