"""Run under ``torchrun``: does ring attention save only O(local K/V) for backward, and is it exact?

Every rank builds the same full q, k, v (``[seq, batch, heads, head_dim]``), then

- measures the bytes autograd keeps for backward (``saved_tensors_hooks``: the untyped
  storage of each saved tensor, each storage counted once) for ring attention over the whole
  sequence on one rank, and over its own ``1/cp`` chunk with the ring over all ranks;
- compares the chunk's output and input gradients with one-rank attention on the whole
  sequence (relative to each tensor's largest value; fp32, only the summation order differs).

Rank 0 prints one JSON line: ``ratio = bytes_per_rank / (bytes_one_rank / cp)``, about 1 for
a ring (q, k, v, out, lse all local) and ``allgather_ratio`` for what an all-gathered K/V
would save at least (the full k and v on every rank, about ``2.5`` at cp 4).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from step_infra.models.parallel import SingleRankGroup
from step_infra.models.ring_attention import ring_attention


def saved_bytes(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``fn()`` and the bytes of the distinct storages autograd saved while running it."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def check(seq: int, batch: int, heads: int, head_dim: int, group: Any) -> dict[str, object]:
    """The measurements of this rank (see the module docstring)."""
    cp, rank = group.size(), group.rank()
    if seq % cp:
        raise ValueError(f"--seq {seq} must be divisible by the {cp} ranks")
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(seq, batch, heads, head_dim, generator=g) for _ in range(4)]
    q, k, v = (t.clone().requires_grad_() for t in full[:3])
    dout = full[3]
    ref, bytes_one = saved_bytes(lambda: ring_attention(q, k, v, SingleRankGroup()))
    ref.backward(dout)

    def chunk(t: torch.Tensor) -> torch.Tensor:
        return t.detach().chunk(cp)[rank].clone()

    ql, kl, vl = (chunk(t).requires_grad_() for t in (q, k, v))
    out, bytes_ring = saved_bytes(lambda: ring_attention(ql, kl, vl, group))
    out.backward(chunk(dout))
    errs = [_rel(out.detach(), chunk(ref))]
    errs += [_rel(mine.grad, chunk(t.grad)) for mine, t in ((ql, q), (kl, k), (vl, v))]  # type: ignore[arg-type]
    kv_rest = (cp - 1) * (kl.nbytes + vl.nbytes)  # the other ranks' k and v, gathered
    stats = torch.tensor([float(bytes_ring), errs[0], max(errs[1:])], dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    per_rank = int(stats[0])
    return {
        "cp": cp,
        "shape": [seq, batch, heads, head_dim],
        "bytes_one_rank": bytes_one,
        "bytes_per_rank": per_rank,
        "ratio": per_rank / (bytes_one / cp),
        "allgather_ratio": (per_rank + kv_rest) / (bytes_one / cp),
        "max_rel_err_output": float(stats[1]),
        "max_rel_err_grad": float(stats[2]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    result = check(args.seq, args.batch, args.heads, args.head_dim, dist.group.WORLD)
    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
