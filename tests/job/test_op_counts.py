"""The emulator's op counts (``EAGER_DIT_OPS_*`` for a micro-batch, ``EAGER_UPDATE_OPS_*`` for
the parameter update) are what the training job's step really dispatches: the emulator prices host dispatch with them, so a model
or trainer change that adds or removes ops must show up here, not as a silent drift of the
prediction. Outside the blocks counts the trainer's whole micro-batch: inputs drawn from each
sample's generator, patchify, timestep and caption embeddings, final layer and loss."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from step_infra.data.stream import Sample
from step_infra.emulator.specs import (
    EAGER_DIT_OPS_OUTSIDE_LAYERS,
    EAGER_DIT_OPS_PER_LAYER,
    EAGER_UPDATE_OPS_OUTSIDE_LAYERS,
    EAGER_UPDATE_OPS_PER_LAYER,
)
from step_infra.models.config import get_preset
from step_infra.models.dit import build_dit
from step_infra.models.parallel import ParallelGroups, clip_grad_norm
from step_infra.topology import ProcessGrid
from step_infra.train.job.config import tiny_t2v
from step_infra.train.job.worker import _forward_backward


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _model(layers: int) -> nn.Module:
    cfg = tiny_t2v()
    config = get_preset(cfg.dit_preset).replace(
        num_layers=layers,
        in_channels=cfg.vae.latent_channels,
        text_dim_short=384,
        text_dim_long=128,
    )
    return build_dit(config, seed=0)


def _ops_of_one_micro_batch(layers: int) -> int:
    cfg = tiny_t2v()
    model = _model(layers)
    frames = cfg.vae.latent_frames(cfg.data.frames)
    side = cfg.data.height // cfg.vae.spatial
    samples = [
        Sample(
            id=i,
            tensors={
                "latent": torch.randn(cfg.vae.latent_channels, frames, side, side),
                "text_short": torch.randn(12, 384),
                "text_long": torch.randn(10, 128),
            },
            metadata={},
        )
        for i in range(cfg.strategy.micro_batch)
    ]
    with _CountOps() as count:
        _forward_backward(model, cfg, samples)
    return count.ops


def test_eager_dit_op_counts_match_the_trainer() -> None:
    two, four = _ops_of_one_micro_batch(2), _ops_of_one_micro_batch(4)
    per_layer = (four - two) / 2
    outside = two - 2 * per_layer
    # caption dropout (drawn per sample id) changes a few ops of the input: 3 %
    assert per_layer == pytest.approx(EAGER_DIT_OPS_PER_LAYER, rel=0.03)
    assert outside == pytest.approx(EAGER_DIT_OPS_OUTSIDE_LAYERS, rel=0.03)


def _ops_of_one_update(layers: int, groups: ParallelGroups) -> int:
    """The worker's update, as it runs it: zero the gradients (kept allocated), clip by the
    global norm (large random gradients: the scaling runs), one per-tensor AdamW step."""
    model = _model(layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), foreach=False)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # Adam's state is created on the first step, not counted
    with _CountOps() as count:
        optimizer.zero_grad(set_to_none=False)
    zero = count.ops
    for p in model.parameters():
        p.grad.normal_()  # type: ignore[union-attr]
    with _CountOps() as count:
        clip_grad_norm(model, groups, max_norm=1.0)
        optimizer.step()
    return zero + count.ops


def test_eager_update_op_counts_match_the_trainer() -> None:
    # one rank: a TP rank holds the same number of parameter tensors (each a shard)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        groups = ParallelGroups.create(ProcessGrid(tp=1, dp=1))
        two, four = _ops_of_one_update(2, groups), _ops_of_one_update(4, groups)
    finally:
        dist.destroy_process_group()
    per_layer = (four - two) / 2
    assert per_layer == pytest.approx(EAGER_UPDATE_OPS_PER_LAYER, rel=0.03)
    assert two - 2 * per_layer == pytest.approx(EAGER_UPDATE_OPS_OUTSIDE_LAYERS, rel=0.03)
