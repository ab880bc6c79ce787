"""Checkpoint averaging, streamed: memory stays at about one model whatever N is.

Each checkpoint is opened memory-mapped (``torch.load(mmap=True)``) and added tensor by
tensor into one float32 accumulator, then released; only the accumulator and the pages of
the tensor being added are resident. Step-Video reports that averaging the checkpoints from
the end of fine-tuning beats an EMA.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def average_checkpoints(
    paths: Sequence[str | Path], out: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """Uniform average of the state dicts at ``paths`` (same keys and shapes required)."""
    if not paths:
        raise ValueError("average_checkpoints needs at least one checkpoint path")
    acc: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for n, path in enumerate(paths):
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if n == 0:
            for k, v in state.items():
                acc[k] = v.to(torch.float32, copy=True)
                dtypes[k] = v.dtype
        else:
            if state.keys() != acc.keys():
                raise ValueError(f"checkpoint {path} has different keys from {paths[0]}")
            for k, v in state.items():
                if v.shape != acc[k].shape:
                    raise ValueError(
                        f"{k}: shape {tuple(v.shape)} in {path}, {tuple(acc[k].shape)} before"
                    )
                acc[k].add_(v.to(torch.float32))
        del state
    result = {k: v.div_(len(paths)).to(dtypes[k]) for k, v in acc.items()}
    if out is not None:
        torch.save(result, out)
    return result
