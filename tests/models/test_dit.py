"""The DiT: shapes, the 30B parameter count, text padding, RoPE, and patchify round trips."""

from __future__ import annotations

import pytest
import torch

from step_infra.models import build_dit, dit_parameter_count, get_preset
from step_infra.models.dit import _patchify, _unpatchify
from step_infra.models.layers import pack_text
from step_infra.models.rope import apply_rope, rope_angles, rope_cos_sin


def test_stepvideo_30b_on_meta_matches_formula() -> None:
    model = build_dit("stepvideo-t2v-30b", device="meta")
    n = model.num_parameters()
    assert n == dit_parameter_count("stepvideo-t2v-30b")
    # REFERENCE.md: about 29.3B derived from the shapes; within 1%.
    assert abs(n - 29.3e9) / 29.3e9 < 0.01
    assert next(model.parameters()).device.type == "meta"


def test_tiny_preset_shapes_and_forward() -> None:
    c = get_preset("tiny-dit")
    assert (c.num_layers, c.hidden_size, c.num_heads, c.head_dim, c.in_channels) == (
        4,
        128,
        4,
        32,
        16,
    )
    model = build_dit("tiny-dit")
    x = torch.randn(2, 16, 3, 4, 4)
    out = model(x, torch.rand(2), torch.randn(2, 6, 384), torch.tensor([6, 2]))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # adaLN-zero start


def test_padded_text_is_ignored() -> None:
    c = get_preset("micro-dit").replace(zero_init_output=False)
    model = build_dit(c, seed=1)
    x, t = torch.randn(1, 4, 2, 4, 4), torch.rand(1)
    text = torch.randn(1, 5, c.text_dim_short)
    garbage = text.clone()
    garbage[:, 3:] = 100.0
    a = model(x, t, text, torch.tensor([3]))
    b = model(x, t, garbage, torch.tensor([3]))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, model(x, t, garbage, torch.tensor([5])))


def test_pack_text_puts_valid_tokens_first() -> None:
    short = torch.arange(3.0).view(1, 3, 1).expand(2, 3, 1).clone()
    long = (10 + torch.arange(2.0)).view(1, 2, 1).expand(2, 2, 1).clone()
    packed, lengths = pack_text(short, torch.tensor([2, 3]), long, torch.tensor([1, 2]))
    assert lengths.tolist() == [3, 5]
    assert packed[0, :3, 0].tolist() == [0.0, 1.0, 10.0]
    assert packed[1, :5, 0].tolist() == [0.0, 1.0, 2.0, 10.0, 11.0]


def test_rope_is_relative_along_each_axis() -> None:
    # q.k after RoPE depends only on the position difference: shift every frame index by one.
    split = (4, 2, 2)
    cos, sin = rope_cos_sin(rope_angles((3, 2, 2), split))
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    qs = apply_rope(q.expand(12, 1, 1, 8), cos, sin)
    ks = apply_rope(k.expand(12, 1, 1, 8), cos, sin)
    # token 0 (f0) vs token 4 (f1), and token 4 (f1) vs token 8 (f2): same offset, same score
    s04 = (qs[0] * ks[4]).sum()
    s48 = (qs[4] * ks[8]).sum()
    torch.testing.assert_close(s04, s48)
    assert not torch.allclose(s04, (qs[0] * ks[8]).sum())


@pytest.mark.parametrize("p", [1, 2])
def test_patchify_round_trip(p: int) -> None:
    x = torch.randn(2, 3, 2, 4, 6)
    tokens = _patchify(x, p)
    assert tokens.shape == (2, 2 * (4 // p) * (6 // p), 3 * p * p)
    torch.testing.assert_close(_unpatchify(tokens, (2, 4 // p, 6 // p), p, 3), x)


def test_bad_inputs_name_the_value() -> None:
    with pytest.raises(ValueError, match="no-such"):
        build_dit("no-such")
    model = build_dit("micro-dit")
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 3, 1, 4, 4), torch.rand(1), torch.randn(1, 2, 24))
