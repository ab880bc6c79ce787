"""StepRPC with CUDA tensors against a plain staged copy of the same bytes, in one run.

:func:`measure_cuda_pipe` starts a producer process that sends one CUDA tensor of ``nbytes``
(``items`` times) and a consumer process on the same host that takes them with
``ConsumerConfig(device="auto")``, so each arrives on its CUDA device: device -> pinned
staging buffer -> the transport (tcp: zmq frames or lanes; shm: a shared-memory segment) ->
host-to-device copy, synchronized before ``get`` returns. The pipe's rate is the consumer's
``(items - 1) / (last arrival - first arrival)``, as ``bench.py`` counts it.

The baseline, in the same run: a plain staged copy of the same bytes in **one process** (this
one): device -> a pinned host buffer -> device, each copy ``non_blocking`` and synchronized,
``items`` times after one warm-up copy. It is the two PCIe/C2C copies every host-staged pipe
pays, without any transport or second process, so ``pipe_vs_staged_copy`` (pipe GiB/s over
copy GiB/s) is what the pipe keeps of the bare copies (1.0 would be a free transport).

``dry_run=True`` runs the same processes and code with CPU tensors of at most 64 KiB (a CPU
test runs it in a few seconds); the result says ``"device": "cpu", "dry_run": True``.
Children are started with ``spawn``, every wait in them has ``timeout_s``, and the parent
kills any child still alive at the end (by its pid) after a failure or timeout.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import time
from typing import Any

import torch

TRANSPORTS = ("tcp", "shm")
DRY_RUN_MAX_BYTES = 64 << 10
DRY_RUN_MAX_ITEMS = 8
_PIPE = "cuda-bench"


def pattern(nbytes: int, device: str | torch.device) -> torch.Tensor:
    """``nbytes`` uint8 bytes ``0, 1, ..., 250, 0, ...`` on ``device`` (what both ends check)."""
    period = torch.arange(251, dtype=torch.uint8, device=device)
    return period.repeat(-(-nbytes // 251))[:nbytes].contiguous()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _produce(address_q: Any, nbytes: int, items: int, device: str, timeout_s: float) -> None:
    from step_infra.rpc.producer import Producer, ProducerConfig

    tensor = pattern(nbytes, device)
    cfg = ProducerConfig(send_timeout_s=timeout_s)
    with Producer(_PIPE, config=cfg) as p:
        address_q.put(p.address)
        p.wait_for_consumers(timeout_s=timeout_s)
        for i in range(items):
            p.send({"x": tensor}, {"i": i})
        p.flush(timeout_s=timeout_s)


def _consume(
    address_q: Any, result_q: Any, nbytes: int, items: int, transport: str, timeout_s: float
) -> None:
    from step_infra.rpc.consumer import Consumer, ConsumerConfig

    address = address_q.get(timeout=timeout_s)
    cfg = ConsumerConfig(transport=transport, device="auto")
    c = Consumer(_PIPE, [address], group="g", config=cfg)
    times: list[float] = []
    devices: set[str] = set()
    identical = True
    try:
        for i in range(items):
            item = c.get(timeout_s=timeout_s)
            if item is None:
                raise TimeoutError(f"item {i} of {items} not there within {timeout_s} s")
            times.append(time.monotonic())
            x = item.tensors["x"]
            devices.add(str(x.device))
            if i in (0, items - 1):  # bit-identical, checked where it arrived
                identical = identical and torch.equal(x, pattern(nbytes, x.device))
        result_q.put(
            {
                "times": times,
                "devices": sorted(devices),
                "identical": identical,
                "transport": c.transports[0],
            }
        )
    finally:
        c.close()


def _staged_copy_gib_per_s(nbytes: int, items: int, device: torch.device) -> float:
    """Device -> pinned host -> device, ``items`` times (after one warm-up), in this process."""
    src = pattern(nbytes, device)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def once() -> None:
        host.copy_(src, non_blocking=True)
        _sync(device)
        dst.copy_(host, non_blocking=True)
        _sync(device)

    once()
    start = time.perf_counter()
    for _ in range(items):
        once()
    elapsed = time.perf_counter() - start
    if not torch.equal(dst, src):
        raise RuntimeError("the staged copy is not bit-identical to its source")
    return items * nbytes / elapsed / (1 << 30)


def _kill(procs: list[Any]) -> None:
    """Join every child briefly, then kill any still alive by its pid."""
    for proc in procs:
        proc.join(5)
        if proc.is_alive() and proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.join(5)


def measure_cuda_pipe(
    nbytes: int,
    items: int,
    transport: str = "tcp",
    *,
    dry_run: bool = False,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Producer process -> consumer process on this host with CUDA tensors of ``nbytes``
    (``items`` of them, at least 2), and a one-process staged copy of the same bytes; GiB/s of
    both and ``pipe_vs_staged_copy``. ``dry_run``: CPU tensors of at most 64 KiB, at most 8
    items (for machines without CUDA). Raises ``RuntimeError`` when a child fails or nothing
    arrives within ``timeout_s``."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport {transport!r}; expected one of {TRANSPORTS}")
    if items < 2:
        raise ValueError(f"items {items}; expected >= 2 (the rate is over arrival intervals)")
    if nbytes < 1:
        raise ValueError(f"nbytes {nbytes}; expected >= 1")
    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError(
            "measure_cuda_pipe needs a CUDA device (torch.cuda.is_available() is False); "
            "pass dry_run=True to run it with CPU tensors"
        )
    if dry_run:
        nbytes, items = min(nbytes, DRY_RUN_MAX_BYTES), min(items, DRY_RUN_MAX_ITEMS)
    device = torch.device("cpu") if dry_run else torch.device("cuda", torch.cuda.current_device())
    ctx = mp.get_context("spawn")
    address_q, result_q = ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(
            target=_produce,
            args=(address_q, nbytes, items, str(device), timeout_s),
            name="cuda-bench-producer",
        ),
        ctx.Process(
            target=_consume,
            args=(address_q, result_q, nbytes, items, transport, timeout_s),
            name="cuda-bench-consumer",
        ),
    ]
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout_s + 30  # the children's start-up (imports)
        while True:
            try:
                got = result_q.get(timeout=0.5)
                break
            except queue.Empty:
                dead = [f"{p.name} ({p.exitcode})" for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"cuda pipe benchmark: no result (exited with an error: {dead})"
                    ) from None
    finally:
        _kill(procs)
    times = got["times"]
    pipe = (len(times) - 1) * nbytes / max(times[-1] - times[0], 1e-9) / (1 << 30)
    staged = _staged_copy_gib_per_s(nbytes, items, device)
    return {
        "device": device.type,
        "dry_run": dry_run,
        "transport": got["transport"],
        "nbytes": nbytes,
        "items": items,
        "consumer_devices": got["devices"],
        "bit_identical": got["identical"],
        "pipe_gib_per_s": pipe,
        "staged_copy_gib_per_s": staged,
        "pipe_vs_staged_copy": pipe / staged,
        "staged_copy": "one process: device -> pinned host -> device, synchronized",
    }


__all__ = ["measure_cuda_pipe", "pattern"]
