"""Best-of-N wall time for the kernel benchmarks (synchronizing CUDA around each call)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def best_time_s(fn: Callable[[], object], *, repeats: int, cuda: bool) -> float:
    """Minimum wall time of ``fn`` over ``repeats`` runs after one warm-up (compilation)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best
