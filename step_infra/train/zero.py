"""ZeRO-1: AdamW whose state is sharded over the data x context-parallel group.

The emulator's ``distributed_optimizer`` divides the optimizer state (Adam's m and v, and in
mixed precision the fp32 master weights) by ``dp x cp``. This is torch's
``ZeroRedundancyOptimizer`` over that group (megatron-core's ``DistributedOptimizer`` needs
CUDA tensors): every parameter is owned by one rank of the group (greedy by size), which
keeps its AdamW state and updates it; the updated parameters are then broadcast from their
owners. Every rank still holds full gradients (the :class:`~step_infra.train.grad_sync.
GradReducer` all-reduces them), so gradient clipping needs no extra communication.

Why it matches one rank's AdamW exactly: AdamW (``foreach=False``) updates each parameter
from its own gradient and state alone, so updating a parameter on its owner is the same
arithmetic as updating it everywhere; ZeRO only chooses where. The state is checkpointed
per parameter, under the same keys as replicated AdamW's (``optim/<slot>/<name>``, see
:func:`step_infra.elastic.checkpoint.state_dict`): each owner writes the parameters it owns,
so a checkpoint loads into any dp size, sharded or not.

What differs from what the emulator prices (``costmodel._time``): Megatron reduce-scatters
the gradients and all-gathers the parameters (1x the gradient bytes each way); here the
gradients are all-reduced (2x) and the parameters broadcast from their owners (1x), so the
data-parallel traffic is 3/2 of the priced amount. Memory is as priced: state / (dp x cp).
Closing that gap needs the reducer to reduce-scatter into per-rank flat shards and a
hand-written flat AdamW (gloo has ``reduce_scatter_tensor`` in torch 2.13); ZeRO's
semantics fit everything else, so none is written by hand yet.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.optim import Optimizer


def make_sharded_adamw(
    params: Iterable[torch.nn.Parameter],
    group: Any,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.99),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
) -> Optimizer:
    """AdamW with its state sharded over ``group`` (``make_dp_cp_group``'s).

    A group of one rank has nothing to shard: plain AdamW. Create it after the model is on
    its device: ZeRO packs each rank's parameters into one flat bucket per device (one
    broadcast per rank instead of one per parameter) and makes ``p.data`` views into it.
    Set ``lr`` per step on ``optimizer.param_groups`` as for AdamW; ZeRO copies it to its
    local optimizer before each step.
    """
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("make_sharded_adamw got no trainable parameters")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    options: dict[str, Any] = {
        "lr": lr,
        "betas": betas,
        "weight_decay": weight_decay,
        "eps": eps,
        "foreach": False,
    }
    if int(group.size()) == 1:
        return torch.optim.AdamW(trainable, **options)
    return ZeroRedundancyOptimizer(
        trainable,
        optimizer_class=torch.optim.AdamW,
        process_group=group,
        parameters_as_bucket_view=True,
        **options,
    )


def local_optimizer(optimizer: Optimizer) -> Optimizer:
    """The optimizer that holds this rank's state: ZeRO's local one, or ``optimizer``."""
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        return optimizer.optim
    return optimizer


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes of optimizer state tensors this rank holds (what ZeRO divides by dp x cp)."""
    total = 0
    for state in local_optimizer(optimizer).state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total
