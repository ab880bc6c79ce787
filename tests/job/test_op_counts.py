"""The emulator's op counts (``EAGER_DIT_OPS_PER_LAYER``, ``..._OUTSIDE_LAYERS``) are what the
training job's step really dispatches: the emulator prices host dispatch with them, so a model
or trainer change that adds or removes ops must show up here, not as a silent drift of the
prediction. Outside the blocks counts the trainer's whole micro-batch: inputs drawn from each
sample's generator, patchify, timestep and caption embeddings, final layer and loss."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from step_infra.data.stream import Sample
from step_infra.emulator.specs import EAGER_DIT_OPS_OUTSIDE_LAYERS, EAGER_DIT_OPS_PER_LAYER
from step_infra.models.config import get_preset
from step_infra.models.dit import build_dit
from step_infra.train.job.config import tiny_t2v
from step_infra.train.job.worker import _forward_backward


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _ops_of_one_micro_batch(layers: int) -> int:
    cfg = tiny_t2v()
    config = get_preset(cfg.dit_preset).replace(
        num_layers=layers,
        in_channels=cfg.vae.latent_channels,
        text_dim_short=384,
        text_dim_long=128,
    )
    model = build_dit(config, seed=0)
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
        for i in range(cfg.micro_batch)
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
