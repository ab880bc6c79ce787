"""Fault tests with real processes: kill -9 a consumer group, kill -9 and restart the producer."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from step_infra.rpc.consumer import Consumer, ConsumerConfig
from step_infra.rpc.producer import Producer, ProducerConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

WORKER = str(Path(__file__).with_name("fault_worker.py"))


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().view(torch.uint8).numpy().tobytes())


def _read(path: Path) -> list[tuple[int, int, int]]:
    rows = []
    for line in path.read_text().splitlines():
        _, seq, sent, got = line.split()
        rows.append((int(seq), int(sent), int(got)))
    return rows


def test_kill9_one_of_three_groups_survivors_get_everything_once(tmp_path: Path) -> None:
    n = 300
    cfg = ProducerConfig(lease_s=1.0, shm=False)
    procs: list[subprocess.Popen[bytes]] = []
    with Producer("faults", name="P", config=cfg) as prod:
        try:
            for g in range(3):
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            WORKER,
                            "consumer",
                            prod.address,
                            f"g{g}",
                            str(tmp_path / f"g{g}.txt"),
                            "0.005",
                        ]
                    )
                )
            prod.wait_for_consumers(groups=3, timeout_s=30)
            for seq in range(n):
                x = torch.randn(256, generator=torch.Generator().manual_seed(seq))
                prod.send({"x": x}, {"crc": _crc(x)})
                if seq == n // 3:
                    os.kill(procs[0].pid, signal.SIGKILL)
            prod.flush(timeout_s=60)
        finally:
            for p in procs:
                if p.poll() is None and p is procs[0]:
                    p.kill()
            for p in procs[1:]:
                p.wait(30)
            procs[0].wait(10)
    dead = _read(tmp_path / "g0.txt")
    survivors = _read(tmp_path / "g1.txt") + _read(tmp_path / "g2.txt")
    assert all(sent == got for _, sent, got in dead + survivors)  # checksums intact
    seqs = [s for s, _, _ in survivors]
    assert len(seqs) == len(set(seqs)), "a survivor consumed an item twice"
    dead_seqs = {s for s, _, _ in dead}
    assert set(seqs) | dead_seqs == set(range(n)), "an item was lost"
    # the dead group acknowledged all it took except at most its last one or two (taken,
    # not yet acknowledged when it died): only those may reach the survivors again
    assert len(set(seqs) & dead_seqs) <= 2
    assert prod.stats.resent >= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_kill9_and_restart_producer_no_dup_no_loss() -> None:
    n = 200
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    first = subprocess.Popen([sys.executable, WORKER, "producer", str(port), str(n), "0"])
    cfg = ConsumerConfig(prefetch=2, heartbeat_s=0.1, transport="tcp")
    c = Consumer("faults", [address], group="g", config=cfg)
    got: list[tuple[int, int, int]] = []
    restarted = None
    try:
        while len(got) < n:
            item = c.get(timeout_s=20)
            assert item is not None, f"stream stopped after {len(got)} items"
            got.append((item.seq, int(item.metadata["crc"]), _crc(item.tensors["x"])))
            time.sleep(0.002)
            if len(got) == n // 2 and restarted is None:
                os.kill(first.pid, signal.SIGKILL)
                first.wait(10)
                # the restarted producer replays from the start; the consumer drops duplicates
                restarted = subprocess.Popen(
                    [sys.executable, WORKER, "producer", str(port), str(n), "0"]
                )
        c.close()
    finally:
        for p in (first, restarted):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    seqs = [s for s, _, _ in got]
    assert seqs == list(range(n))  # in order, none duplicated, none lost
    assert all(a == b for _, a, b in got)
    assert c.stats.duplicates >= 1
    assert c.position() == {"P": n}


def _rss_with_shared(p: Any) -> int:
    """Resident bytes; on Linux they include the shared-memory pages a process touched (an
    shm producer's copies of its items)."""
    return int(p.memory_info().rss)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_memory_bounded_while_consumer_stalls(transport: str) -> None:
    """A consumer that takes nothing for 10 s: the producer holds at most
    ``max_inflight_bytes`` (its buffers, and on shm its shared-memory copies: RSS counts both)
    and the consumer its prefetch window, each within 1.2x the bound."""
    import psutil

    limit_mib, item_mib, n = 64, 4, 80
    port = _free_port()
    prod = subprocess.Popen(
        [
            sys.executable,
            WORKER,
            "memprod",
            str(port),
            str(limit_mib),
            str(item_mib),
            str(n),
            transport,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    cons = None
    try:
        assert prod.stdout is not None
        address = prod.stdout.readline().strip()
        assert address.startswith("tcp://"), address
        base_producer = _rss_with_shared(psutil.Process(prod.pid))  # before any item exists
        cons = subprocess.Popen(
            [sys.executable, WORKER, "stalled", address, "10", str(n), transport],
            stdout=subprocess.PIPE,
        )
        assert cons.stdout is not None
        assert cons.stdout.readline().strip() == b"ready"
        ps = {"producer": psutil.Process(prod.pid), "consumer": psutil.Process(cons.pid)}
        base = {"producer": base_producer, "consumer": _rss_with_shared(ps["consumer"])}
        peak = dict(base)
        while prod.poll() is None or cons.poll() is None:
            for k, p in ps.items():
                with contextlib.suppress(psutil.NoSuchProcess):
                    peak[k] = max(peak[k], _rss_with_shared(p))
            time.sleep(0.05)
        assert prod.returncode == 0 and cons.returncode == 0
    finally:
        for p in (prod, cons):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    bound = 1.2 * (limit_mib << 20)
    # growth over the idle process: within the in-flight limit + 20% (n * item_mib = 320 MiB
    # would be sent without backpressure)
    growth_mib = {k: round((peak[k] - base[k]) / (1 << 20), 1) for k in ps}
    print(f"{transport}: peak RSS growth MiB {growth_mib}, bound {bound / (1 << 20):.0f} MiB")
    for k in ps:
        assert peak[k] - base[k] <= bound, (k, (peak[k] - base[k]) / (1 << 20))


def _start_registry(port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "step_infra.cli",
            "registry",
            "--port",
            str(port),
            "--token",
            "tok",
            "--lease-s",
            "2",
            "--run-s",
            "60",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert "listening" in proc.stdout.readline()
    return proc


def test_registry_kill9_and_restart_stream_continues() -> None:
    from step_infra.rpc.registry import RegistryClient

    port = _free_port()
    reg = _start_registry(port)
    address = f"127.0.0.1:{port}"
    restarted = None
    try:
        prod = Producer("live", name="P", registry=RegistryClient(address, "tok"))
        cons = Consumer.from_registry(
            "live",
            RegistryClient(address, "tok"),
            group="g",
            config=ConsumerConfig(heartbeat_s=0.1),
        )
        prod.wait_for_consumers()
        got = []
        for i in range(60):
            prod.send({"x": torch.full((4,), float(i))})
            item = cons.get(timeout_s=5)
            assert item is not None, f"stream stopped at item {i}"
            got.append(item.seq)
            if i == 20:
                reg.kill()  # kill -9 the registry mid-stream
                reg.wait(10)
            if i == 40:
                restarted = _start_registry(port)
            time.sleep(0.05)
        assert got == list(range(60))
        # Keep-alive rounds after the restart re-register both: polled until they have,
        # however long a loaded machine takes to run one.
        client = RegistryClient(address, "tok")
        deadline = time.monotonic() + 30
        while True:
            prod.poll(10)
            cons.get(timeout_s=0.1)
            try:
                info = client.lookup("live")
            except grpc.RpcError as e:  # the restarted registry knows the pipe once one is back
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                producers, groups = [], []
            else:
                producers = [e.address for e in info.producers]
                groups = [e.group for e in info.consumers]
            if (producers, groups) == ([prod.address], ["g"]) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert producers == [prod.address]  # re-registered
        assert groups == ["g"]
        cons.close()
        prod.close()
    finally:
        for p in (reg, restarted):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
