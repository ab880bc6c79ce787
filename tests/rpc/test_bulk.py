"""Bulk channels for large items (tcp lanes, ucx) and stale shared-memory cleanup."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import zlib

import pytest
import torch

from step_infra.rpc import ucx as ucx_mod
from step_infra.rpc.consumer import Consumer, ConsumerConfig
from step_infra.rpc.lanes import BufferPool, LaneSender
from step_infra.rpc.producer import Producer, ProducerConfig
from step_infra.rpc.shm import (
    SHM_DIR,
    ShmPool,
    remove_stale_segments,
    select_endpoint,
    shm_available,
)
from step_infra.rpc.transport import make_transport

pytestmark = pytest.mark.timeout(60)


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().view(torch.uint8).numpy().tobytes())


def _item(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    latent = torch.randn(3000 + 7 * i, generator=g).to(torch.bfloat16)  # odd sizes: padding
    return {"latent": latent, "ids": torch.arange(5 + i, dtype=torch.int64), "empty": latent[:0]}


def _stream(transport: str, n: int, consumer_cfg: ConsumerConfig) -> tuple[list, Producer]:
    """Send ``n`` items big enough for the bulk channel; return what the consumer took."""
    cfg = ProducerConfig(transport=transport, shm=False, lane_min_bytes=1024)
    got: list[tuple[int, int, int, str]] = []
    with Producer("bulk", config=cfg) as prod:
        cons = Consumer("bulk", [prod.address], group="g", config=consumer_cfg)

        def run() -> None:
            while len(got) < n:
                item = cons.get(timeout_s=10)
                assert item is not None, f"timed out after {len(got)} items"
                t = item.tensors
                got.append((item.seq, _crc(t["latent"]), _crc(t["ids"]), str(t["empty"].shape)))

        th = threading.Thread(target=run)
        th.start()
        prod.wait_for_consumers()
        sent = []
        for i in range(n):
            item = _item(i)
            prod.send(item, {"i": i})
            sent.append((i, _crc(item["latent"]), _crc(item["ids"]), str(item["empty"].shape)))
        th.join(30)
        bulk = [type(m.channel.sender).__name__ for m in prod._members.values()]
        cons.close()
        prod.flush(timeout_s=10)
    assert got == sent  # every item once, in order, bytes intact (checksums)
    return bulk, prod


def test_lanes_deliver_large_items_in_order_intact() -> None:
    bulk, _ = _stream("tcp", 30, ConsumerConfig(transport="tcp", prefetch=3))
    assert bulk == ["LaneSender"]


def test_lanes_off_uses_zmq_frames() -> None:
    bulk, _ = _stream("tcp", 5, ConsumerConfig(transport="tcp", lanes=0))
    assert bulk == ["NoneType"]


def test_lane_stripes_cover_the_payload_exactly() -> None:
    class Sink:
        def __init__(self) -> None:
            self.data = bytearray()

        def sendall(self, b: object) -> None:
            self.data += bytes(b)  # type: ignore[call-overload]

    sender = LaneSender.__new__(LaneSender)
    sender._socks = [None] * 3  # type: ignore[list-item]
    jobs: list = []
    sender._queues = [type("Q", (), {"put": staticmethod(jobs.append)})() for _ in range(3)]  # type: ignore[misc]
    bufs = [memoryview(bytes(range(100)) * 50), memoryview(b"x" * 10)]
    sender.send(7, bufs, [0, 5056], 5120)
    out = bytearray(5120)
    for job in jobs:
        for off, view in job.segments:
            lo, hi = max(off, job.start), min(off + view.nbytes, job.stop)
            if lo < hi:
                out[lo:hi] = view[lo - off : hi - off]
    assert bytes(out[:5000]) == bytes(bufs[0]) and bytes(out[5056:5066]) == b"x" * 10
    assert sum(j.stop - j.start for j in jobs) == 5120


def test_buffer_pool_reuses_only_unreferenced_buffers() -> None:
    pool = BufferPool(keep=1)
    view = torch.frombuffer(memoryview(pool.get(1000)), dtype=torch.uint8)  # type: ignore[arg-type]
    first = view.data_ptr()
    view.fill_(1)
    assert pool.get(1000).ctypes.data != first  # still referenced through the tensor
    del view
    assert pool.get(1000).ctypes.data == first  # free again: reused


def test_ucx_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ucx_mod, "ucx_unavailable", lambda: f"{ucx_mod.UCXX_HINT} (test)")
    with pytest.raises(ValueError, match=r"ucxx-cu12.*|rdma"):
        make_transport("ucx")
    with pytest.raises(ValueError, match="rdma"):
        Producer("p", config=ProducerConfig(transport="ucx"))


def test_force_ucx_needs_a_ucx_endpoint() -> None:
    with pytest.raises(ValueError, match="no ucx endpoint"):
        select_endpoint("tcp://127.0.0.1:5", force="ucx")
    assert select_endpoint("ucx://127.0.0.1:5", force="tcp") == ("tcp://127.0.0.1:5", False)


def test_ucx_transport_over_tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    why = ucx_mod.ucx_unavailable()
    if why is not None:
        print(f"SKIP ucx: {why}")
        pytest.skip(why)
    monkeypatch.setenv("UCX_TLS", "tcp")  # no RDMA device here: UCX over TCP
    monkeypatch.setenv("UCX_WARN_UNUSED_ENV_VARS", "n")
    bulk, _ = _stream("ucx", 12, ConsumerConfig(transport="ucx", prefetch=2))
    assert bulk == ["UcxSender"]


@pytest.mark.skipif(not shm_available(), reason="no writable /dev/shm")
def test_stale_segments_of_dead_pids_are_removed() -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    pid = int(dead.stdout)  # that process has exited
    stale = os.path.join(SHM_DIR, f"steprpc-{pid}-deadbeef00000000")
    mine = os.path.join(SHM_DIR, f"steprpc-{os.getpid()}-feedface00000000")
    other = os.path.join(SHM_DIR, "steprpc-not-a-pid")
    for path in (stale, mine, other):
        open(path, "wb").close()
    try:
        ShmPool().close()  # a new pool cleans up first
        assert not os.path.exists(stale)
        assert os.path.exists(mine) and os.path.exists(other)
        assert remove_stale_segments() == []
    finally:
        for path in (stale, mine, other):
            if os.path.exists(path):
                os.unlink(path)


def test_lanes_that_break_mid_stream_lose_nothing_and_keep_the_order() -> None:
    """The consumer's lane connections are cut twice while items are on the way: each cut is a
    ``lane_failed`` event with its reason, the items the lanes owed are asked for again and
    arrive over zmq frames in their place, fresh lanes are connected, nothing is lost."""
    n = 40
    cfg = ProducerConfig(shm=False, lane_min_bytes=1024)
    got: list[tuple[int, int]] = []
    with Producer("bulk", config=cfg) as prod:
        cons = Consumer("bulk", [prod.address], group="g", config=ConsumerConfig(transport="tcp"))

        def run() -> None:
            while len(got) < n:
                item = cons.get(timeout_s=15)
                assert item is not None, f"timed out after {len(got)} items"
                got.append((item.seq, _crc(item.tensors["latent"])))
                if len(got) in (10, 25):  # cut every lane under the consumer's feet
                    bulk = cons._links[0].channel.receiver
                    assert bulk is not None
                    for s in bulk._socks:  # type: ignore[union-attr]
                        s.shutdown(2)

        th = threading.Thread(target=run)
        th.start()
        prod.wait_for_consumers()
        sent = []
        for i in range(n):
            item = _item(i)
            prod.send(item)
            sent.append((i, _crc(item["latent"])))
        th.join(60)
        assert not th.is_alive()
        cons.close()
        prod.flush(timeout_s=10)
    assert got == sent  # every item once, in order, intact
    failures = [e for e in cons.stats.events if e["kind"] == "lane_failed"]
    assert failures and all(e["reason"] for e in failures)  # one or more per cut
    assert [e["kind"] for e in prod.stats.events].count("nack") >= len(failures)
    assert prod.stats.resent >= 1
