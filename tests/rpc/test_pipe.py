"""Producer/consumer over real loopback sockets (threads in one process)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import zmq

from step_infra.rpc.consumer import Consumer, ConsumerConfig
from step_infra.rpc.producer import Producer, ProducerConfig

pytestmark = pytest.mark.timeout(60)


def _consume(c: Consumer, out: list, stop: threading.Event, delay_s: float = 0.0) -> None:
    while not stop.is_set():
        item = c.get(timeout_s=0.2)
        if item is None:
            continue
        out.append((item.producer, item.seq, float(item.tensors["x"].sum())))
        if delay_s:
            time.sleep(delay_s)
    c.close()


def _run(producer: Producer, consumers: list[Consumer], n: int, delays: list[float]) -> list[list]:
    outs: list[list] = [[] for _ in consumers]
    stop = threading.Event()
    threads = [
        threading.Thread(target=_consume, args=(c, o, stop, d))
        for c, o, d in zip(consumers, outs, delays, strict=True)
    ]
    for t in threads:
        t.start()
    producer.wait_for_consumers(groups=len({c.group for c in consumers}))
    for i in range(n):
        producer.send({"x": torch.full((8,), float(i))}, {"id": i})
    producer.flush(timeout_s=30)
    stop.set()
    for t in threads:
        t.join(10)
    return outs


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_spray_exactly_once_in_order(transport: str) -> None:
    cfg = ConsumerConfig(transport=transport)
    with Producer("p", config=ProducerConfig()) as prod:
        cons = [Consumer("p", [prod.address], group=f"g{i}", config=cfg) for i in range(3)]
        assert all(c.transports == [transport] for c in cons)
        outs = _run(prod, cons, 60, [0.0, 0.0, 0.0])
    seqs = sorted(s for o in outs for _, s, _ in o)
    assert seqs == list(range(60))
    for o in outs:
        assert [s for _, s, _ in o] == sorted(s for _, s, _ in o)  # per-producer order
        assert all(v == 8.0 * s for _, s, v in o)
        assert len(o) > 0


def test_group_members_get_same_items() -> None:
    with Producer("p") as prod:
        cons = [
            Consumer("p", [prod.address], group="a", member="0"),
            Consumer("p", [prod.address], group="a", member="1"),
            Consumer("p", [prod.address], group="b", member="0"),
        ]
        prod.wait_for_consumers(groups=2)
        deadline = time.monotonic() + 30  # the second member of "a" says hello, however loaded
        while len(prod.groups().get("a", [])) < 2:
            assert time.monotonic() < deadline, f"members: {prod.groups()}"
            prod.poll(50)
        outs = _run(prod, cons, 40, [0.0, 0.0, 0.0])
    assert [s for _, s, _ in outs[0]] == [s for _, s, _ in outs[1]]
    assert sorted(s for _, s, _ in outs[0] + outs[2]) == list(range(40))


def test_broadcast_every_group_every_item() -> None:
    with Producer("p", config=ProducerConfig(mode="broadcast")) as prod:
        cons = [
            Consumer("p", [prod.address], group="g0", config=ConsumerConfig(transport="tcp")),
            Consumer("p", [prod.address], group="g1", config=ConsumerConfig(transport="shm")),
        ]
        outs = _run(prod, cons, 30, [0.0, 0.0])
    for o in outs:
        assert [s for _, s, _ in o] == list(range(30))


def test_faster_group_gets_more() -> None:
    with Producer("p") as prod:
        cons = [
            Consumer("p", [prod.address], group=f"g{i}", config=ConsumerConfig(prefetch=1))
            for i in range(2)
        ]
        outs = _run(prod, cons, 60, [0.01, 0.02])
    ratio = len(outs[0]) / max(len(outs[1]), 1)
    assert 1.4 < ratio < 2.8, ratio


def test_backpressure_bounds_inflight() -> None:
    item_bytes = 4096 * 4
    cfg = ProducerConfig(max_inflight_bytes=3 * item_bytes + 1024)
    with Producer("p", config=cfg) as prod:
        cons = Consumer("p", [prod.address], group="g", config=ConsumerConfig(prefetch=64))
        prod.wait_for_consumers()
        peak = 0
        done = threading.Event()
        got: list[int] = []

        def slow() -> None:
            while len(got) < 20:
                item = cons.get(timeout_s=5)
                assert item is not None
                got.append(item.seq)
                time.sleep(0.01)
            cons.close()
            done.set()

        t = threading.Thread(target=slow)
        t.start()
        for _ in range(20):
            prod.send({"x": torch.zeros(4096)})
            peak = max(peak, prod.inflight_bytes)
        prod.flush()
        t.join(10)
    assert got == list(range(20))
    assert peak <= cfg.max_inflight_bytes


def test_lease_expiry_resprays_unacked() -> None:
    cfg = ProducerConfig(lease_s=0.5)
    with Producer("p", config=cfg) as prod:
        # "dead" says hello (4 credits) but never takes anything nor heartbeats
        dead = Consumer("p", [prod.address], group="dead", config=ConsumerConfig(prefetch=4))
        live = Consumer("p", [prod.address], group="live", config=ConsumerConfig(heartbeat_s=0.1))
        got: list = []
        stop = threading.Event()
        t = threading.Thread(target=_consume, args=(live, got, stop))
        t.start()
        prod.wait_for_consumers(groups=2)
        for i in range(10):
            prod.send({"x": torch.full((8,), float(i))})
        prod.flush(timeout_s=20)
        stop.set()
        t.join(10)
        dead.close()
        assert sorted(s for _, s, _ in got) == list(range(10))
        assert prod.stats.resent > 0


def test_queue_items_lets_send_work_ahead_of_consumers() -> None:
    """With ``queue_items`` a producer encodes ahead while no consumer is there (trainers
    starting or restarting): sends return, items wait in order, and beyond the queue send
    blocks again (here until its send timeout, which leaves the item queued)."""
    send_timeout_s = 1.0
    cfg = ProducerConfig(queue_items=5, send_timeout_s=send_timeout_s)
    with Producer("p", config=cfg) as prod:
        t0 = time.monotonic()
        for i in range(5):
            prod.send({"x": torch.full((8,), float(i))})
        # No consumer, yet none of the five blocked: all five together took less than half
        # of one send timeout (a blocked send takes a whole one), loaded machine or not.
        assert time.monotonic() - t0 < send_timeout_s / 2
        assert prod.queued == 5
        t0 = time.monotonic()
        prod.send({"x": torch.full((8,), 5.0)})
        assert time.monotonic() - t0 >= send_timeout_s * 0.99  # the sixth waited for credit
        cons = Consumer("p", [prod.address], group="g")
        got = []
        while len(got) < 6:
            prod.poll(10)
            item = cons.get(timeout_s=0.05)
            if item is not None:
                got.append(float(item.tensors["x"][0]))
        cons.close()
    assert got == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # the timed-out send stays queued, in order


def test_keep_alive_holds_the_lease_without_taking() -> None:
    """A stage waiting on its own consumers calls keep_alive: its producer must not take it
    for dead and re-spray what it holds to another group."""
    with Producer("p", config=ProducerConfig(lease_s=0.5)) as prod:
        busy = Consumer(
            "p", [prod.address], group="busy", config=ConsumerConfig(prefetch=4, heartbeat_s=0.1)
        )
        prod.wait_for_consumers()
        for i in range(4):  # all four go to "busy", the only group
            prod.send({"x": torch.full((8,), float(i))})
        other = Consumer("p", [prod.address], group="other", config=ConsumerConfig(prefetch=4))
        prod.wait_for_consumers(groups=2)
        end = time.monotonic() + 1.5  # three leases
        while time.monotonic() < end:
            busy.keep_alive()
            prod.poll(50)
        assert other.get(timeout_s=0.2) is None  # nothing was re-sprayed to "other"
        assert prod.stats.resent == 0
        assert [busy.get(timeout_s=2).seq for _ in range(4)] == [0, 1, 2, 3]  # type: ignore[union-attr]
        busy.close()
        other.close()


def test_resume_skips_consumed_and_dedupes() -> None:
    with Producer("p", name="A") as prod:
        c = Consumer("p", [prod.address], group="g", resume={"A": 5})
        outs = _run(prod, [c], 8, [0.0])
    assert [s for _, s, _ in outs[0]] == [5, 6, 7]
    assert c.stats.duplicates == 5
    assert c.position() == {"A": 8}


def test_malformed_frames_counted_link_survives() -> None:
    with Producer("p") as prod:
        c = Consumer("p", [prod.address], group="g")
        prod.wait_for_consumers()
        # garbage on the control path
        ctx = zmq.Context()
        bad = ctx.socket(zmq.DEALER)
        bad.setsockopt(zmq.LINGER, 0)
        bad.connect(prod.address.split(";")[0])
        bad.send(b"\xc1garbage")
        bad.send_multipart([b"a", b"b"])
        # garbage on the data path: a raw frame set straight to the consumer
        ident = b"g/0"
        prod.poll(50)
        prod._sock.send_multipart([ident, b"\xff\x00junk", b"x"])
        prod.send({"x": torch.ones(3)})
        item = c.get(timeout_s=5)
        assert item is not None and item.seq == 0
        assert c.stats.malformed == 1
        prod.poll(100)
        assert prod.stats.malformed == 2
        bad.close()
        ctx.term()
        c.close()


def test_iterable_dataset_adapter() -> None:
    from torch.utils.data import DataLoader

    from step_infra.rpc.dataset import PipeDataset

    with Producer("p") as prod:
        ds = PipeDataset("p", [prod.address], group="g", limit=5)
        got: list[dict] = []
        t = threading.Thread(target=lambda: got.extend(DataLoader(ds, batch_size=None)))
        t.start()
        prod.wait_for_consumers()
        for i in range(6):
            prod.send({"x": torch.full((2,), float(i))}, {"id": i})
        t.join(20)
    assert [int(b["metadata"]["id"]) for b in got] == [0, 1, 2, 3, 4]
    assert torch.equal(got[3]["x"], torch.full((2,), 3.0))


def test_shm_auto_selected_and_zero_copy_and_cleaned_up() -> None:
    import os

    with Producer("p") as prod:
        c = Consumer("p", [prod.address], group="g")
        assert c.transports == ["shm"]
        prod.wait_for_consumers()
        t = torch.randn(64, 64).to(torch.bfloat16)
        prod.send({"x": t, "i": torch.arange(5)})
        item = c.get(timeout_s=5)
        assert item is not None
        assert torch.equal(item.tensors["x"], t) and torch.equal(item.tensors["i"], torch.arange(5))
        seg = msgpack_header_segment(prod)
        assert seg is not None and os.path.exists(f"/dev/shm/{seg}")
        c.close()
    assert not os.path.exists(f"/dev/shm/{seg}")  # unlinked on close


def msgpack_header_segment(prod: Producer) -> str | None:
    pending = next(iter(prod._pending.values()), None)
    return None if pending is None or pending.segment is None else pending.segment.name


def test_force_shm_without_shm_endpoint_is_an_error() -> None:
    with (
        Producer("p", config=ProducerConfig(shm=False)) as prod,
        pytest.raises(ValueError, match="shm"),
    ):
        Consumer("p", [prod.address], config=ConsumerConfig(transport="shm"))


def test_manual_ack_keeps_items_until_acknowledged() -> None:
    """A trainer acks only what its checkpoint covers: items taken after it are re-sprayed
    when the trainer goes away, items it acknowledged are not."""
    manual = ConsumerConfig(transport="tcp", ack="manual", prefetch=4)
    with Producer("p") as prod:
        first = Consumer("p", [prod.address], group="gen0", config=manual)
        prod.wait_for_consumers(groups=1)
        for i in range(4):
            prod.send({"x": torch.full((2,), float(i))}, {"id": i})
            prod.poll(10)
        taken = []
        while len(taken) < 4:  # credit comes back on take, so all four arrive
            item = first.get(timeout_s=0.2)
            if item is not None:
                taken.append(item)
            prod.poll(10)
        first.acknowledge(taken[:2])
        deadline = time.monotonic() + 5
        while prod.unacked > 2 and time.monotonic() < deadline:
            prod.poll(20)
        assert prod.unacked == 2  # items 2 and 3 are kept: not acknowledged
        first.close()  # "bye": its group is gone, its unacknowledged items go elsewhere
        second = Consumer("p", [prod.address], group="gen1", config=manual)
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            prod.poll(20)
            item = second.get(timeout_s=0.05)
            if item is not None:
                got.append(int(item.metadata["id"]))
        second.acknowledge([])
        second.close()
    assert got == [2, 3]


def test_ack_mode_is_validated() -> None:
    with pytest.raises(ValueError, match="ack 'later'"):
        ConsumerConfig(ack="later")


def test_item_sent_to_a_vanished_member_goes_to_a_live_group() -> None:
    """A member that vanished without a goodbye (kill -9) is unreachable before its lease
    expires: an item the producer could not hand to it must go elsewhere, not count as sent."""
    tcp = ConsumerConfig(transport="tcp")
    with Producer("p", config=ProducerConfig(lease_s=30.0)) as prod:
        ghost = Consumer("p", [prod.address], group="ghost", config=tcp)
        prod.wait_for_consumers(groups=1)
        for link in ghost._links:  # the process died: its socket is gone, no "bye"
            link.sock.close(linger=0)
        time.sleep(0.3)
        live = Consumer("p", [prod.address], group="live", config=tcp)
        prod.wait_for_consumers(groups=2)
        got: list[int] = []
        deadline = time.monotonic() + 10
        sent = 0
        while len(got) < 6 and time.monotonic() < deadline:
            if sent < 6:
                prod.send({"x": torch.full((2,), float(sent))}, {"id": sent})
                sent += 1
            prod.poll(10)
            item = live.get(timeout_s=0.05)
            if item is not None:
                got.append(int(item.metadata["id"]))
        live.close()
    assert sorted(got) == list(range(6))


def test_shm_copies_and_idle_segments_count_against_the_memory_bound() -> None:
    """The producer's shared-memory copies are memory it holds: a same-host group takes a
    burst of items over shm and leaves (the pool keeps their segments for reuse), then a tcp
    group stalls. ``send`` must block at ``max_inflight_bytes`` counting the idle segments too
    (it unmaps them to make room), not at the bound plus the segments."""
    mib = 1 << 20
    cfg = ProducerConfig(max_inflight_bytes=8 * mib, send_timeout_s=0.3, queue_items=64)
    with Producer("p", config=cfg) as prod:
        local = Consumer("p", [prod.address], group="a", config=ConsumerConfig(prefetch=6))
        assert local.transports == ["shm"]
        prod.wait_for_consumers()
        for i in range(6):
            prod.send({"x": torch.full((mib // 4,), float(i))})
        for _ in range(6):
            assert local.get(timeout_s=5) is not None
        local.close()  # acknowledges the last item and leaves
        deadline = time.monotonic() + 5
        while (prod.unacked or prod.groups()) and time.monotonic() < deadline:
            prod.poll(20)
        assert prod.held_bytes >= 6 * mib  # the idle segments, kept for reuse
        remote = Consumer("p", [prod.address], group="b", config=ConsumerConfig(transport="tcp"))
        prod.wait_for_consumers()
        peak = 0
        with pytest.raises(TimeoutError):  # the tcp group stalls: send() must block
            for i in range(64):
                prod.send({"x": torch.full((mib // 4,), float(i))})
                peak = max(peak, prod.held_bytes)
        assert peak <= 8 * mib + mib + 4096, peak / mib
        assert prod.inflight_bytes >= 6 * mib  # the idle segments gave their room to the queue
        remote.close()
