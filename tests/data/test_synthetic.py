"""Synthetic clips are deterministic, captioned in two languages, and the motion check reads them."""

from __future__ import annotations

import pytest
import torch

from step_infra.data import SyntheticClips, SyntheticConfig, motion_accuracy, predicted_direction
from step_infra.data.motion import caption_direction, motion_score


def test_clips_are_deterministic_by_seed() -> None:
    a = SyntheticClips(SyntheticConfig(num_clips=8, seed=3))
    b = SyntheticClips(SyntheticConfig(num_clips=8, seed=3))
    c = SyntheticClips(SyntheticConfig(num_clips=8, seed=4))
    assert torch.equal(a[5]["video"], b[5]["video"])  # type: ignore[arg-type]
    assert any(not torch.equal(a[i]["video"], c[i]["video"]) for i in range(8))  # type: ignore[arg-type]


def test_shapes_range_and_captions() -> None:
    ds = SyntheticClips(SyntheticConfig(num_clips=4, frames=6, height=12, width=20))
    item = ds[1]
    video = item["video"]
    assert isinstance(video, torch.Tensor)
    assert video.shape == (3, 6, 12, 20)
    assert video.min() >= -1 and video.max() <= 1
    assert str(item["caption_en"]).startswith("a ") and "moves" in str(item["caption_en"])
    assert "移动" in str(item["caption_zh"])
    assert caption_direction(str(item["caption_en"])) == item["direction"]
    assert caption_direction(str(item["caption_zh"])) == item["direction"]


def test_motion_check_reads_rendered_direction() -> None:
    ds = SyntheticClips(SyntheticConfig(num_clips=64, seed=1))
    batch = ds.batch(list(range(64)))
    assert motion_accuracy(batch["video"], batch["caption_en"]) == 1.0  # type: ignore[arg-type]
    # Reversing time reverses the motion: every clip is then wrong.
    flipped = batch["video"].flip(2)  # type: ignore[union-attr]
    assert motion_accuracy(flipped, batch["caption_en"]) == 0.0  # type: ignore[arg-type]
    assert motion_score(batch["video"][0], batch["caption_zh"][0]) > 2.0  # type: ignore[index]


def test_static_or_noise_is_not_a_direction() -> None:
    still = SyntheticClips(SyntheticConfig(num_clips=1))[0]["video"]
    assert isinstance(still, torch.Tensor)
    frozen = still[:, :1].expand_as(still)
    assert predicted_direction(frozen) is None


def test_bad_config_names_value() -> None:
    with pytest.raises(ValueError, match="sideways"):
        SyntheticConfig(directions=("left", "sideways"))
