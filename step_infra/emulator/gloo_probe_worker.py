"""One rank of the hardware probe's two-process gloo measurement (``hwprobe.measure_gloo_allreduce``).

    python -m step_infra.emulator.gloo_probe_worker RANK PORT LOOPBACK_MB REPS

A training step issues its collectives between bursts of compute and pays their sum, so every
all-reduce here follows a fixed amount of matmul work (fixed work, not fixed time: a rank that
computes slower arrives later, as in a job), and the *mean* over ``REPS`` is kept. Then the
``LOOPBACK_MB`` all-reduce runs asynchronously beside a compute burst of about its length, to
see how much of it hides. Rank 0 prints one JSON line (seconds): ``hot_small_s`` (median of a
1-element all-reduce issued back to back), ``sizes`` (bytes -> mean in-context seconds, for
64 KiB, 1 MiB and ``LOOPBACK_MB``), and the medians ``compute_s``, ``allreduce_s`` and
``overlapped_s`` of the overlap probe. The parent fits and interprets them.

A module of its own (not a string run with ``python -c``) so that it is typed and linted; it
imports torch only, and the parent starts it with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist


def _burst(a: torch.Tensor, n: int) -> None:
    """Fixed work, not fixed time: ranks that run slower arrive later, as in a job."""
    for _ in range(n):
        a @ a


def _in_context_s(a: torch.Tensor, nbytes: int, count: int, work: int = 8) -> float:
    """Mean seconds in ``all_reduce`` of a fresh tensor issued right after a burst of compute
    (the first two of ``count + 2`` are warm-up)."""
    base, out = torch.ones(max(1, nbytes // 4)), []
    for i in range(count + 2):
        t = base.clone()
        _burst(a, work)
        t0 = time.perf_counter()
        dist.all_reduce(t)
        dt = time.perf_counter() - t0
        if i >= 2:
            out.append(dt)
    return statistics.mean(out)


def measure(mb: int, reps: int) -> dict[str, object]:
    """Every timing of this rank (the process group is set up)."""
    a = torch.randn(256, 256)
    small = torch.ones(1)
    hot = []
    for _ in range(50):
        t0 = time.perf_counter()
        dist.all_reduce(small)
        hot.append(time.perf_counter() - t0)
    big = mb * 2**20
    sizes = {64 * 1024: _in_context_s(a, 64 * 1024, reps), 2**20: _in_context_s(a, 2**20, reps)}
    sizes[big] = _in_context_s(a, big, max(3, reps // 12))
    # Overlap: the big all-reduce launched asynchronously while this rank computes about as long.
    work, alone, both, comm = 60, [], [], []
    for _ in range(max(9, reps // 5)):
        t = torch.ones(big // 4)
        dist.barrier()
        t0 = time.perf_counter()
        _burst(a, work)
        alone.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        comm.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        handle = dist.all_reduce(t, async_op=True)
        _burst(a, work)
        assert handle is not None
        handle.wait()
        both.append(time.perf_counter() - t0)
    return {
        "hot_small_s": statistics.median(hot),
        "sizes": sizes,
        "compute_s": statistics.median(alone),
        "allreduce_s": statistics.median(comm),
        "overlapped_s": statistics.median(both),
    }


def main(argv: list[str]) -> None:
    """``RANK PORT LOOPBACK_MB REPS``: join the 2-rank group, measure, rank 0 prints JSON."""
    rank, port, mb, reps = int(argv[0]), argv[1], int(argv[2]), int(argv[3])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    result = measure(mb, reps)
    if rank == 0:
        sys.stdout.write(json.dumps(result) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
