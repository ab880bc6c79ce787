"""Diffusion-DPO, reflow (Turbo) and the preference tool, on small stand-in models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from step_infra.data import SyntheticClips, SyntheticConfig, motion_score
from step_infra.recipes.preference import build_preference_pairs, load_pairs
from step_infra.train.dpo import diffusion_dpo_loss
from step_infra.train.flow import FlowConfig
from step_infra.train.turbo import reflow_loss


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(5, 4)


def _vel(m: torch.nn.Module):  # type: ignore[no-untyped-def]
    return lambda x, t, text: m(torch.cat([x, t[:, None]], 1))


def test_dpo_starts_at_log2_and_training_prefers_winners() -> None:
    policy, ref = _model(0), _model(0)
    ref.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x_w, x_l = torch.randn(64, 4, generator=g) + 2, torch.randn(64, 4, generator=g) - 2
    flow = FlowConfig()
    loss, _ = diffusion_dpo_loss(_vel(policy), _vel(ref), x_w, x_l, {}, beta=1.0, flow=flow)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-5)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(100):
        loss, info = diffusion_dpo_loss(
            _vel(policy), _vel(ref), x_w, x_l, {}, beta=1.0, flow=flow, generator=g
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 and info["reward_accuracy"] > 0.7
    with pytest.raises(ValueError, match="differ"):
        diffusion_dpo_loss(_vel(policy), _vel(ref), x_w, x_l[:, :2], {}, beta=1.0, flow=flow)


def test_reflow_loss_is_zero_on_straight_lines() -> None:
    x0, noise = torch.randn(8, 3), torch.randn(8, 3)
    assert reflow_loss(lambda x, t: noise - x0, x0, noise, flow=FlowConfig()).item() < 1e-12
    assert reflow_loss(lambda x, t: torch.zeros_like(x), x0, noise, flow=FlowConfig()).item() > 0.1


def test_preference_tool_pairs_best_and_worst(tmp_path: Path) -> None:
    clips = SyntheticClips(SyntheticConfig(num_clips=8, seed=2))
    prompts = [str(clips[i]["caption_en"]) for i in range(4)]

    def generate(ps: list[str], seed: int) -> torch.Tensor:
        # candidate k of prompt i is clip i, reversed in time when seed is odd (wrong motion)
        vids = torch.stack([clips[i]["video"] for i in range(len(ps))])  # type: ignore[misc]
        return vids.flip(2) if seed % 2 else vids

    pairs, samples = build_preference_pairs(
        prompts, generate=generate, decode=lambda z: z, out_dir=tmp_path, candidates=2
    )
    assert len(pairs) == 4 and samples.shape[0] == 8
    for p in pairs:
        assert p.preferred % 2 == 0 and p.rejected % 2 == 1  # forward-in-time wins
        assert p.score_preferred > 0 > p.score_rejected
    assert load_pairs(tmp_path / "pairs.jsonl") == pairs
    # A pluggable scorer that likes backwards motion flips every pair.
    contrarian, _ = build_preference_pairs(prompts, generate=generate, decode=lambda z: z, out_dir=tmp_path,
                                           candidates=2, scorer=lambda v, c: -motion_score(v, c))  # fmt: skip
    assert all(p.preferred % 2 == 1 for p in contrarian)
    with pytest.raises(ValueError, match="at least 2"):
        build_preference_pairs(
            prompts, generate=generate, decode=lambda z: z, out_dir=tmp_path, candidates=1
        )
