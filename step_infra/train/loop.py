"""A single-process training loop for the DiT and the text-conditioning plumbing it needs.

Kept deliberately small: AdamW with linear warm-up, gradient clipping, an optional callback
every ``checkpoint_every`` steps (the recipes save checkpoints there), and the per-step loss
history returned to the caller. The update after a backward is :func:`apply_update`, on one
process and on many: the streaming job's ranks (:mod:`step_infra.train.job.worker`) call it
with their process groups, so gradient reduction and clipping are written once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from step_infra.models.parallel import ParallelGroups, clip_grad_norm, finalize_grads

log = logging.getLogger(__name__)

TextBatch = dict[str, torch.Tensor]


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimConfig:
    """Optimizer and schedule of one stage."""

    steps: int
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    checkpoint_every: int = 0  # 0: never

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0:
            raise ValueError(f"steps must be >= 1 and lr > 0, got steps={self.steps}, lr={self.lr}")


def pad_features(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[L_i, D]`` rows into ``[B, max L, D]`` (zero padded) and their lengths."""
    length = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), length, rows[0].shape[1])
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out, torch.tensor([r.shape[0] for r in rows])


class TextCache:
    """Text features per caption, computed once (the synthetic captions are a small set)."""

    def __init__(self, encode: Callable[[list[str]], TextBatch]) -> None:
        self.encode = encode
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def batch(self, captions: list[str], drop: torch.Tensor | None = None) -> TextBatch:
        """Padded features for ``captions``; rows where ``drop`` is True get the null prompt."""
        missing = sorted({c for c in captions if c not in self._rows})
        if missing:
            f = self.encode(missing)
            for i, c in enumerate(missing):
                self._rows[c] = (
                    f["text_short"][i, : int(f["short_lengths"][i])].clone(),
                    f["text_long"][i, : int(f["long_lengths"][i])].clone(),
                )
        shorts, longs = [], []
        for i, c in enumerate(captions):
            s, lg = self._rows[c]
            if drop is not None and bool(drop[i]):
                s, lg = torch.zeros(1, s.shape[1]), torch.zeros(1, lg.shape[1])
            shorts.append(s)
            longs.append(lg)
        ts, sl = pad_features(shorts)
        tl, ll = pad_features(longs)
        return {"text_short": ts, "short_lengths": sl, "text_long": tl, "long_lengths": ll}

    def null(self, batch: int) -> TextBatch:
        """The empty prompt (one zero token per encoder) for classifier-free guidance."""
        if not self._rows:
            raise ValueError("encode at least one caption before asking for the null prompt")
        s, lg = next(iter(self._rows.values()))
        one = torch.ones(batch, dtype=torch.long)
        return {
            "text_short": torch.zeros(batch, 1, s.shape[1]),
            "short_lengths": one,
            "text_long": torch.zeros(batch, 1, lg.shape[1]),
            "long_lengths": one.clone(),
        }


def make_optimizer(
    model: nn.Module, config: OptimConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99)
    )
    warm = max(1, config.warmup_steps)

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, config.steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def apply_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    grad_clip: float,
    groups: ParallelGroups | None = None,
    dp_mean: bool = True,
    ride_along: list[torch.Tensor] | None = None,
) -> float:
    """After a backward: reduce gradients over ``groups`` (TP partial sums, CP sums, DP mean
    or, with ``dp_mean=False``, sum; ``ride_along`` tensors are summed over DP in the same
    all-reduce), clip by the global norm, step. Returns the norm before clipping."""
    if groups is not None:
        finalize_grads(model, groups, dp_mean=dp_mean, ride_along=ride_along or [])
    norm = clip_grad_norm(model, groups, grad_clip)
    optimizer.step()
    return norm


def train(
    model: nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    config: OptimConfig,
    *,
    on_checkpoint: Callable[[int], None] | None = None,
) -> list[float]:
    """Run ``config.steps`` optimizer steps of ``loss_fn(step)``; return the loss per step."""
    model.train()
    opt, sched = make_optimizer(model, config)
    losses: list[float] = []
    for step in range(config.steps):
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        apply_update(model, opt, grad_clip=config.grad_clip)
        sched.step()
        losses.append(float(loss.detach()))
        if on_checkpoint and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            on_checkpoint(step + 1)
    model.eval()
    return losses


def loss_drop(losses: list[float], fraction: float = 0.2) -> tuple[float, float]:
    """Mean loss over the first and last ``fraction`` of the steps (noise-robust "did it fall")."""
    n = max(1, int(len(losses) * fraction))
    return sum(losses[:n]) / n, sum(losses[-n:]) / n


def infinite(indices: int, batch: int, seed: int) -> Iterator[list[int]]:
    """Endless shuffled mini-batches of ``range(indices)``, deterministic by ``seed``."""
    if indices < 1 or batch < 1:
        raise ValueError(f"need indices >= 1 and batch >= 1, got indices={indices}, batch={batch}")
    batch = min(batch, indices)
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(indices, generator=g).tolist()
        for i in range(0, indices - batch + 1, batch):
            yield perm[i : i + batch]
