"""Megatron-style sequence parallelism: the column- and row-parallel linears of the SP region.

With sequence parallelism (Korthikanti et al. 2022, arXiv 2205.05198, sec. 4.2.2) the
activations outside the tensor-parallel region (norms, modulation, gates, residuals) are split
along the sequence over the TP ranks; the column linear all-gathers the sequence on the way
in and the row linear reduce-scatters it on the way out, in place of the all-reduce that plain
tensor parallelism pays. Per linear, forward and backward::

    column  fwd: all-gather x (S/tp -> S), y = x W_i^T           (saves the S/tp shard only)
            bwd: all-gather x again (for dW), dx = dy W_i, reduce-scatter dx (S -> S/tp)
    row     fwd: y = x_i W_i^T (partial sum), reduce-scatter y (S -> S/tp), + bias
            bwd: all-gather dy (S/tp -> S), dx_i = dy W_i, dW_i = dy^T x_i

Why hand-written: megatron-core's own sequence-parallel mappings allocate their buffers with
``torch.cuda.current_device()`` and so cannot run on the CPU (gloo), where this project tests
every parallel layer against one rank. The classes below take megatron's constructor keywords
(those the DiT uses), keep its parameter names (``weight``, ``bias``) and attributes
(``tensor_model_parallel``, ``partition_dim``, ``partition_stride``, ``allreduce``) and return
``(output, bias_or_None)``, so the DiT's initializer, checkpoints (keyed by TP rank) and
``gather_full_state`` treat them as megatron's linears. The row bias is added after the
reduce-scatter, on this rank's sequence shard only: its gradient is a partial sum per TP rank,
marked ``tp_partial_grad`` for :func:`~step_infra.models.parallel.finalize_grads`.

Collectives are along dim 0 (the sequence of megatron's ``[s, b, h]`` layout), where the
shards of a contiguous tensor are contiguous and need no copy. See ``docs/sequence_parallel.md``.
"""

from __future__ import annotations

from typing import Any, Literal, overload

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn


def native_reduce_scatter(backend: str, device_type: str) -> bool:
    """Whether ``backend`` (as ``dist.get_backend`` names it, e.g. ``"nccl"`` or
    ``"cpu:gloo,cuda:nccl"``) reduce-scatters tensors on ``device_type`` natively."""
    if ":" in backend:  # one backend per device type
        backend = dict(part.split(":", 1) for part in backend.split(",")).get(device_type, "")
    return backend == "nccl"


def _all_gather_op() -> Any:
    # torch 2.13 deprecates ``all_gather_into_tensor`` in favour of this name.
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _reduce_scatter_op() -> Any:
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Pending:
    """An asynchronous collective's result: ``wait()`` blocks until it is there."""

    def __init__(self, work: Any, finish: Any) -> None:
        self._work, self._finish = work, finish

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
        result: torch.Tensor = self._finish()
        return result


@overload
def all_gather(x: torch.Tensor, group: Any, *, async_op: Literal[False] = ...) -> torch.Tensor: ...
@overload
def all_gather(x: torch.Tensor, group: Any, *, async_op: Literal[True]) -> Pending: ...
def all_gather(x: torch.Tensor, group: Any, *, async_op: bool = False) -> torch.Tensor | Pending:
    """Concatenate every rank's ``x`` along dim 0 (``[s, ...] -> [s * n, ...]``).

    Returns the tensor, or a :class:`Pending` with ``async_op=True`` (to overlap a matmul).
    """
    n = group.size()
    if n == 1:
        return Pending(None, lambda: x) if async_op else x
    out = x.new_empty((x.shape[0] * n, *x.shape[1:]))
    work = _all_gather_op()(out, x.contiguous(), group=group, async_op=async_op)
    return Pending(work, lambda: out) if async_op else out


@overload
def reduce_scatter(
    x: torch.Tensor, group: Any, *, async_op: Literal[False] = ...
) -> torch.Tensor: ...
@overload
def reduce_scatter(x: torch.Tensor, group: Any, *, async_op: Literal[True]) -> Pending: ...
def reduce_scatter(
    x: torch.Tensor, group: Any, *, async_op: bool = False
) -> torch.Tensor | Pending:
    """Sum ``x`` over the ranks and keep this rank's chunk of dim 0 (``[s, ...] -> [s / n,
    ...]``); ``x`` is not modified. Returns the tensor, or a :class:`Pending` (``async_op``).

    NCCL reduce-scatters natively: each rank receives ``(n - 1) / n`` of the bytes. Elsewhere
    (gloo, the CPU backend) it is an all-reduce followed by taking this rank's chunk:
    twice the traffic, which is what gloo's own ``reduce_scatter_tensor`` does inside in recent
    torch (pytorch#118911), while older torch lacks it on gloo; doing it here works on every
    version. The chunk is copied out so the result does not keep the whole reduced buffer
    alive when autograd saves it (e.g. in a gated residual).
    """
    n = group.size()
    if n == 1:
        return Pending(None, lambda: x) if async_op else x
    if x.shape[0] % n:
        raise ValueError(
            f"reduce_scatter: dim 0 of {tuple(x.shape)} does not split over {n} ranks; "
            "the sequence must be a multiple of the group size"
        )
    if native_reduce_scatter(str(dist.get_backend(group)), x.device.type):
        out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
        work = _reduce_scatter_op()(out, x.contiguous(), group=group, async_op=async_op)
        return Pending(work, lambda: out) if async_op else out
    buf = x.clone(memory_format=torch.contiguous_format)
    work = dist.all_reduce(buf, group=group, async_op=async_op)
    rank = group.rank()
    pending = Pending(work, lambda: buf.chunk(n, dim=0)[rank].clone())
    return pending if async_op else pending.wait()


class _GatherLinear(torch.autograd.Function):
    """``y = all_gather(x) W^T + b``, saving only the local shard ``x`` for backward.

    Backward re-gathers ``x`` for the weight gradient while ``dx = dy W`` computes, then
    reduce-scatters ``dx`` while ``dW`` computes (megatron's overlap of the two collectives).
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: Any
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.has_bias = group, bias is not None
        return F.linear(all_gather(x, group), weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gathering = all_gather(x, ctx.group, async_op=True) if need_w else None
        grad_full = grad.matmul(weight) if need_x else None  # (S, B, in)
        full = gathering.wait() if gathering is not None else None
        scattering = None
        if grad_full is not None:  # overlaps the weight-gradient matmul below
            scattering = reduce_scatter(grad_full, ctx.group, async_op=True)
        grad_w = grad_b = None
        if need_w:
            assert full is not None
            grad_w = grad.reshape(-1, grad.shape[-1]).t().matmul(full.reshape(-1, full.shape[-1]))
        if need_b and ctx.has_bias:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        grad_x = scattering.wait() if scattering is not None else None
        return grad_x, grad_w, grad_b, None


class _ReduceScatter(torch.autograd.Function):
    """Forward: reduce-scatter along dim 0. Backward: all-gather the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out: torch.Tensor = reduce_scatter(x, group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_gather(grad, ctx.group), None


class _SequenceParallelLinear(nn.Module):
    """Shared set-up: the local weight drawn as megatron's CPU initialization does (the full
    master weight, then this rank's slice along ``partition_dim``), parameter attributes, and
    megatron's empty ``_extra_state`` (so state dicts keep megatron's keys)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: Any,
        init_method: Any,
        partition_dim: int,
        stride: int,
        tp_group: Any,
    ) -> None:
        super().__init__()
        if tp_group is None:
            raise ValueError("sequence-parallel linears need tp_group= (no global groups)")
        if stride != 1:
            raise ValueError(f"stride={stride}: the sequence-parallel linears support stride 1")
        if getattr(config, "gradient_accumulation_fusion", False):
            raise ValueError("gradient_accumulation_fusion is not supported by these linears")
        self.input_size, self.output_size = input_size, output_size
        self.config, self.tp_group = config, tp_group
        self.sequence_parallel = True
        n, rank = int(tp_group.size()), int(tp_group.rank())
        full = [output_size, input_size]
        if full[partition_dim] % n:
            raise ValueError(
                f"{'output' if partition_dim == 0 else 'input'} size {full[partition_dim]} does "
                f"not split over tp={n}; choose sizes divisible by the tensor-parallel size"
            )
        local = list(full)
        local[partition_dim] //= n
        self.weight = nn.Parameter(torch.empty(local, dtype=config.params_dtype))
        if config.perform_initialization:
            master = torch.empty(full, dtype=torch.float)
            init_method(master)
            with torch.no_grad():
                self.weight.copy_(master.to(config.params_dtype).chunk(n, partition_dim)[rank])
        set_tensor_model_parallel_attributes(self.weight, True, partition_dim, stride)
        self.weight.allreduce = True  # type: ignore[attr-defined]
        self._register_load_state_dict_pre_hook(
            lambda state_dict, prefix, *args, **kwargs: state_dict.setdefault(
                f"{prefix}_extra_state"
            )
        )

    def _new_bias(self, size: int) -> nn.Parameter:
        bias = nn.Parameter(torch.empty(size, dtype=self.config.params_dtype))
        if self.config.perform_initialization:
            with torch.no_grad():
                bias.zero_()
        bias.allreduce = True  # type: ignore[attr-defined]
        return bias

    def get_extra_state(self) -> None:
        """Megatron's linears keep an empty extra state for Transformer-Engine's state dicts."""
        return None

    def set_extra_state(self, state: Any) -> None:
        pass

    def extra_repr(self) -> str:
        return (
            f"in_features={self.input_size}, out_features={self.output_size}, "
            f"bias={self.bias is not None}, TP={self.tp_group.size()}"
        )


class SequenceParallelColumnLinear(_SequenceParallelLinear):
    """Column-parallel linear whose input is sequence-sharded: ``[s/tp, b, in] -> [s, b,
    out/tp]`` (the full sequence of this rank's output columns, e.g. its heads)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: Any,
        init_method: Any,
        bias: bool = True,
        gather_output: bool = False,
        stride: int = 1,
        skip_bias_add: bool = False,
        disable_grad_reduce: bool = False,
        tp_group: Any = None,
    ) -> None:
        if gather_output:
            raise ValueError(
                "gather_output=True: a sequence-parallel column linear keeps its split"
            )
        if disable_grad_reduce:
            raise ValueError(
                "disable_grad_reduce=True: the input gradient's reduce-scatter is what returns "
                "each rank its sequence shard; it cannot be skipped"
            )
        super().__init__(
            input_size,
            output_size,
            config=config,
            init_method=init_method,
            partition_dim=0,
            stride=stride,
            tp_group=tp_group,
        )
        self.gather_output, self.skip_bias_add = False, skip_bias_add
        self.output_size_per_partition = self.weight.shape[0]
        self.bias = self._new_bias(self.output_size_per_partition) if bias else None
        if self.bias is not None:
            set_tensor_model_parallel_attributes(self.bias, True, 0, stride)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = None if self.skip_bias_add else self.bias
        out = _GatherLinear.apply(x, self.weight, bias, self.tp_group)  # (S, B, out/tp)
        return out, self.bias if self.skip_bias_add else None


class SequenceParallelRowLinear(_SequenceParallelLinear):
    """Row-parallel linear whose output is sequence-sharded: ``[s, b, in/tp] -> [s/tp, b,
    out]``, the partial products summed and scattered in one reduce-scatter."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: Any,
        init_method: Any,
        bias: bool,
        input_is_parallel: bool,
        skip_bias_add: bool,
        stride: int = 1,
        tp_group: Any = None,
    ) -> None:
        if not input_is_parallel:
            raise ValueError("input_is_parallel=False: sequence parallelism needs it True")
        super().__init__(
            input_size,
            output_size,
            config=config,
            init_method=init_method,
            partition_dim=1,
            stride=stride,
            tp_group=tp_group,
        )
        self.input_is_parallel, self.skip_bias_add = True, skip_bias_add
        self.input_size_per_partition = self.weight.shape[1]
        self.bias = self._new_bias(output_size) if bias else None
        if self.bias is not None:  # added on this rank's sequence shard only
            self.bias.sequence_parallel = True  # type: ignore[attr-defined]
            self.bias.tp_partial_grad = True  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        partial = F.linear(x, self.weight)  # (S, B, out), this rank's share of the sum
        out = partial
        if self.tp_group.size() > 1:
            out = _ReduceScatter.apply(partial, self.tp_group)  # (S/tp, B, out)
        if self.skip_bias_add:
            return out, self.bias
        return (out + self.bias if self.bias is not None else out), None
