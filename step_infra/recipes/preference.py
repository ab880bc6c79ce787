"""Preference tool: sample candidates per prompt, score them, keep (best, worst) pairs.

There are no human annotators here, so preference comes from a pluggable scorer
``(video [3, F, H, W], caption) -> float`` (higher is better); the default for the synthetic
data is the motion check (signed displacement along the direction the caption asks for).
Output: ``samples.pt`` (the candidate latents, indexed by sample id) and ``pairs.jsonl``,
one ``{"prompt", "preferred", "rejected", "score_preferred", "score_rejected"}`` a line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from step_infra.data.motion import motion_score

Scorer = Callable[[torch.Tensor, str], float]
Generate = Callable[[list[str], int], torch.Tensor]  # (prompts, seed) -> latents [B, ...]
Decode = Callable[[torch.Tensor], torch.Tensor]  # latents -> videos [B, 3, F, H, W]


@dataclass(frozen=True, slots=True, kw_only=True)
class PreferencePair:
    prompt: str
    preferred: int
    rejected: int
    score_preferred: float
    score_rejected: float


def build_preference_pairs(
    prompts: Sequence[str],
    *,
    generate: Generate,
    decode: Decode,
    out_dir: str | Path,
    candidates: int = 4,
    scorer: Scorer = motion_score,
    min_margin: float = 0.0,
    seed: int = 0,
) -> tuple[list[PreferencePair], torch.Tensor]:
    """Generate ``candidates`` samples per prompt, score them, write and return the pairs."""
    if candidates < 2:
        raise ValueError(f"need at least 2 candidates per prompt to form a pair, got {candidates}")
    prompts = list(prompts)
    latents = torch.stack([generate(prompts, seed + k) for k in range(candidates)], dim=1)
    flat = latents.flatten(0, 1)  # sample id = prompt index * candidates + k
    videos = decode(flat)
    scores = [scorer(videos[i], prompts[i // candidates]) for i in range(flat.shape[0])]
    pairs = []
    for p, prompt in enumerate(prompts):
        ids = list(range(p * candidates, (p + 1) * candidates))
        best = max(ids, key=lambda i: scores[i])
        worst = min(ids, key=lambda i: scores[i])
        if scores[best] - scores[worst] > min_margin:
            pairs.append(PreferencePair(prompt=prompt, preferred=best, rejected=worst,
                                        score_preferred=scores[best], score_rejected=scores[worst]))  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(flat, out / "samples.pt")
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as fh:
        for pair in pairs:
            fh.write(json.dumps({
                "prompt": pair.prompt, "preferred": pair.preferred, "rejected": pair.rejected,
                "score_preferred": pair.score_preferred, "score_rejected": pair.score_rejected,
            }, ensure_ascii=False) + "\n")  # fmt: skip
    return pairs, flat


def load_pairs(path: str | Path) -> list[PreferencePair]:
    """Read a ``pairs.jsonl`` written by :func:`build_preference_pairs` (or by hand)."""
    pairs = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = {"prompt", "preferred", "rejected"} - row.keys()
            if missing:
                raise ValueError(f"{path}:{n}: missing {sorted(missing)}")
            pairs.append(PreferencePair(
                prompt=row["prompt"], preferred=int(row["preferred"]), rejected=int(row["rejected"]),
                score_preferred=float(row.get("score_preferred", 0.0)),
                score_rejected=float(row.get("score_rejected", 0.0)),
            ))  # fmt: skip
    return pairs
