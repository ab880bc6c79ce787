"""Peers that send what they should not: every refused message is counted, nothing raises out
of the producer's or consumer's API, repeat offenders are dropped, and the real peers on the
same pipe keep getting every item. One test per fault found by the independent check."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import msgpack
import pytest
import torch

from step_infra.rpc.consumer import Consumer, ConsumerConfig
from step_infra.rpc.lanes import HELLO, MAGIC, STRIPE, LaneListener
from step_infra.rpc.producer import Producer, ProducerConfig

sys.path.insert(0, str(Path(__file__).parent))  # the shared misbehaving peers
from hostile import FakeProducer, RawPeer, item_header, pack

pytestmark = pytest.mark.timeout(60)

TCP = ConsumerConfig(transport="tcp", heartbeat_s=0.1)
OPEN = ProducerConfig(shm=False)


def _stream(prod: Producer, cons: Consumer, n: int) -> list[int]:
    """Send ``n`` items through the pipe (polling as a real producer does) and return the seqs
    the consumer got."""
    got: list[int] = []
    for i in range(n):
        prod.send({"x": torch.full((4,), float(i))})
        item = cons.get(timeout_s=5)
        assert item is not None, f"stream stopped at item {i}"
        got.append(item.seq)
    assert cons.get(timeout_s=0.05) is None  # acknowledges the last item
    prod.flush(timeout_s=10)
    return got


# ------------------------------------------------------------------ producer's control path
BAD_HELLOS = {
    "credit_str": {"k": "hello", "group": "r", "credit": "x"},
    "size_str": {"k": "hello", "group": "r", "size": "x"},
    "lanes_str": {"k": "hello", "group": "r", "lanes": "x"},
    "credit_none": {"k": "hello", "group": "r", "credit": None},
    "credit_negative": {"k": "hello", "group": "r", "credit": -5},
    "group_list": {"k": "hello", "group": ["a"]},
    "not_a_map": [1, 2, 3],
    "unknown_kind": {"k": "steal", "all": True},
}


@pytest.mark.parametrize("name", sorted(BAD_HELLOS))
def test_a_malformed_hello_is_counted_and_the_producer_keeps_serving(name: str) -> None:
    with Producer("p", config=OPEN) as prod, RawPeer(prod) as peer:
        cons = Consumer("p", [prod.address], group="g", config=TCP)
        prod.wait_for_consumers()
        peer.send(pack(BAD_HELLOS[name]))
        for _ in range(20):
            prod.poll(10)  # raised ValueError/TypeError before the schema
        assert prod.stats.malformed == 1
        assert _stream(prod, cons, 5) == list(range(5))
        assert prod.groups() == {"g": ["g/0"]}  # the bad hello joined nobody
        cons.close()


BAD_MEMBER_MESSAGES = {
    "n_str": {"k": "credit", "n": "zz"},
    "acks_of_str": {"k": "credit", "acks": ["a"]},
    "acks_int": {"k": "credit", "acks": 5},
    "ack_acks_none": {"k": "ack", "acks": None},
    "huge_credit": {"k": "credit", "n": 1 << 40},
    "nack_seqs_str": {"k": "nack", "seqs": "all"},
}


@pytest.mark.parametrize("name", sorted(BAD_MEMBER_MESSAGES))
def test_a_malformed_message_from_a_member_is_counted_and_send_flush_poll_go_on(
    name: str,
) -> None:
    with Producer("p", config=OPEN) as prod, RawPeer(prod, b"g/1") as peer:
        cons = Consumer("p", [prod.address], group="g", config=TCP)
        peer.send(pack({"k": "hello", "group": "other", "credit": 0}))  # a member, no credit
        prod.wait_for_consumers(groups=2)
        peer.send(pack(BAD_MEMBER_MESSAGES[name]))
        for _ in range(20):
            prod.poll(10)
        assert prod.stats.malformed == 1
        assert _stream(prod, cons, 5) == list(range(5))  # send() and flush() did not raise
        cons.close()


def test_wrong_frame_counts_are_refused() -> None:
    with Producer("p", config=OPEN) as prod, RawPeer(prod) as peer:
        peer.send(pack({"k": "hello", "group": "r"}), b"mac?", b"extra", b"extra")
        peer.send(*[b"x"] * 100)
        peer.received(prod, 0.2)
        assert prod.stats.malformed == 2
        assert prod.groups() == {}


def test_well_formed_messages_from_a_non_member_are_counted_and_not_acted_on() -> None:
    with Producer("p", config=OPEN) as prod, RawPeer(prod) as peer:
        peer.send(pack({"k": "credit", "n": 50, "acks": [0, 1, 2]}))
        peer.send(pack({"k": "nack", "seqs": [0]}))
        replies = peer.received(prod, 0.3)
        assert prod.stats.refused == 2 and prod.stats.malformed == 0
        assert [msgpack.unpackb(r[0], raw=False)["k"] for r in replies] == ["who", "who"]
        assert prod.groups() == {}


def test_a_repeat_offender_is_dropped_and_then_ignored() -> None:
    cfg = ProducerConfig(shm=False, max_offences=4, ban_s=30.0)
    with Producer("p", config=cfg) as prod, RawPeer(prod, b"bad/0") as peer:
        peer.send(pack({"k": "hello", "group": "bad", "credit": 1}))
        peer.received(prod, 0.2)
        assert "bad" in prod.groups()
        for _ in range(10):
            peer.send(b"\xc1 not msgpack")
        peer.received(prod, 0.3)
        assert prod.stats.malformed == 4  # counted until banned ...
        assert prod.stats.refused == 6  # ... then ignored
        assert prod.stats.dropped_peers == 1
        assert "bad" not in prod.groups()  # dropped as a member too
        assert [e["kind"] for e in prod.stats.events] == ["peer_dropped"]


# ------------------------------------------------------------------ consumer's receive path
def test_an_item_announcing_a_huge_flat_payload_is_refused_before_allocating() -> None:
    with FakeProducer() as fake:
        cons = Consumer("p", [fake.address], group="g", config=TCP)
        fake.wait_hello()
        fake.send(pack(item_header(0, flat=2**50, offs=[0], sizes=[16])))  # MemoryError before
        fake.send(pack(item_header(1, shapes=[[2**20, 2**20]])), b"\0" * 16)  # 4 TiB by shape
        fake.send(pack(item_header(2)), torch.arange(4.0).numpy().tobytes())
        item = cons.get(timeout_s=5)
        assert item is not None and item.seq == 2
        assert item.tensors["x"].tolist() == [0.0, 1.0, 2.0, 3.0]
        assert cons.stats.malformed == 2
        cons.close()


def test_a_huge_size_in_a_lane_record_breaks_the_link_not_the_thread_and_the_item_comes_again() -> (
    None
):
    lanes = LaneListener("127.0.0.1")
    cons = None
    try:
        with FakeProducer() as fake:
            cons = Consumer("p", [fake.address], group="g", config=TCP)
            assert fake.wait_hello()["lanes"] == 4
            token = lanes.expect(1)
            fake.send(pack({"k": "lanes", "port": lanes.port, "token": token, "n": 1}))
            deadline = time.monotonic() + 5
            socks = None
            while socks is None and time.monotonic() < deadline:
                cons.get(timeout_s=0.05)  # the consumer connects its lane
                socks = lanes.take(token)
            assert socks is not None
            # a stripe announcing 2**50 bytes: its thread died silently before
            socks[0].sendall(STRIPE.pack(MAGIC, 0, 7, 2**50, 0, 64))
            payload = torch.arange(4.0)
            fake.send(pack(item_header(7, flat=64, offs=[0], sizes=[16])))
            nack = None
            deadline = time.monotonic() + 10
            while nack is None and time.monotonic() < deadline:
                assert cons.get(timeout_s=0.1) is None
                nack = next((m for m in fake.read(0.0) if m["k"] == "nack"), None)
            assert nack is not None, "the consumer never asked for the item again"
            assert nack["seqs"] == [7]
            # the reason names the size: over the limit, or (when the header came first) not
            # what the header announced
            assert str(2**50) in nack["reason"]
            fake.send(pack(item_header(7)), payload.numpy().tobytes())  # resent as zmq frames
            item = cons.get(timeout_s=5)
            assert item is not None and item.seq == 7
            assert item.tensors["x"].tolist() == payload.tolist()
            assert [e["kind"] for e in cons.stats.events] == ["lane_failed"]
    finally:
        if cons is not None:
            cons.close()
        lanes.close()


def test_a_producer_sending_beyond_its_credit_cannot_grow_the_consumers_queue() -> None:
    with FakeProducer() as fake:
        cons = Consumer("p", [fake.address], group="g", config=ConsumerConfig(prefetch=4))
        assert fake.wait_hello()["credit"] == 4
        for seq in range(30):  # ignores credit altogether
            fake.send(pack(item_header(seq)), torch.zeros(4).numpy().tobytes())
        time.sleep(0.3)
        got = []
        while (item := cons.get(timeout_s=0.3)) is not None:
            got.append(item.seq)
        assert got == list(range(10))  # its window twice over, plus two: then refused
        assert cons.stats.malformed == 8 and cons.stats.dropped_peers == 1  # then closed
        cons.close()


def test_garbage_from_a_producer_link_is_counted_and_a_repeat_offender_link_closed() -> None:
    with FakeProducer() as fake:
        cfg = ConsumerConfig(transport="tcp", heartbeat_s=0.1, max_offences=5)
        cons = Consumer("p", [fake.address], group="g", config=cfg)
        fake.wait_hello()
        fake.send(pack(item_header(0)), torch.zeros(4).numpy().tobytes())
        assert cons.get(timeout_s=5) is not None
        for junk in (b"\xc1", pack({"k": "who", "nonce": 5}), pack(item_header(-1))):
            fake.send(junk)
        fake.send(pack(item_header(1)), b"short")
        fake.send(pack(item_header(1, dtypes=["object"])), b"\0" * 16)
        assert cons.get(timeout_s=0.5) is None
        assert cons.stats.malformed == 5
        assert cons.stats.dropped_peers == 1
        with pytest.raises(ConnectionError, match="every producer link was closed"):
            cons.get()  # waiting for ever on no link is an error, not a hang
        cons.close()


# ------------------------------------------------------------------ authentication
TOKEN = "job-token-1"


def test_with_a_token_only_members_that_prove_it_get_credit_or_items() -> None:
    cfg = ProducerConfig(shm=False, token=TOKEN)
    with Producer("p", config=cfg) as prod, RawPeer(prod, b"rogue/0") as rogue:
        assert ";epoch=" in prod.address
        good = Consumer(
            "p", [prod.address], group="g", config=ConsumerConfig(token=TOKEN, transport="tcp")
        )
        wrong = Consumer(
            "p", [prod.address], group="w", config=ConsumerConfig(token="guess", transport="tcp")
        )
        rogue.send(pack({"k": "hello", "group": "r", "credit": 100}))  # the old protocol
        rogue.send(pack({"k": "credit", "n": 100}))
        prod.wait_for_consumers(groups=1)
        got = _stream(prod, good, 20)
        assert got == list(range(20))  # every item to the one proven group, none sprayed away
        replies = rogue.received(prod, 0.3)
        kinds = {msgpack.unpackb(r[0], raw=False)["k"] for r in replies}
        assert kinds == {"who"}  # challenges only: no welcome, no lanes, no item
        assert wrong.get(timeout_s=0.3) is None
        assert set(prod.groups()) == {"g"}
        assert prod.stats.unauthenticated >= 2  # the wrong proof and the rogue's credit
        good.close()
        wrong.close()


def test_a_consumer_without_the_token_gets_nothing_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = ProducerConfig(shm=False, token=TOKEN, queue_items=1)  # send() queues, no consumer
    with Producer("p", config=cfg) as prod:
        cons = Consumer("p", [prod.address], group="g", config=TCP)
        prod.send({"x": torch.ones(4)})
        for _ in range(5):
            prod.poll(20)
            assert cons.get(timeout_s=0.05) is None
        assert prod.groups() == {}
        assert "requires the job token" in caplog.text
        cons.close()


def test_a_peer_taking_over_a_members_identity_cannot_ack_its_items() -> None:
    """After a member's connection is gone, a peer with the same identity but without its
    session key sends an ack: refused, the item stays held (and goes to the member again)."""
    cfg = ProducerConfig(shm=False, token=TOKEN, lease_s=30.0)
    with Producer("p", config=cfg) as prod:
        cons = Consumer(
            "p",
            [prod.address],
            group="g",
            config=ConsumerConfig(token=TOKEN, transport="tcp", ack="manual"),
        )
        prod.wait_for_consumers()
        prod.send({"x": torch.ones(4)})
        assert cons.get(timeout_s=5) is not None
        for link in cons._links:
            link.sock.close(linger=0)  # gone without a bye
        time.sleep(0.2)
        with RawPeer(prod, b"g/0") as thief:
            thief.send(pack({"k": "ack", "acks": [0], "c": 99}), b"0" * 16)
            thief.received(prod, 0.3)
        assert prod.unacked == 1
        assert prod.stats.unauthenticated == 1
        cons.close()


def test_the_registrys_token_authenticates_the_data_plane_by_default() -> None:
    """A producer and a consumer made with the job's registry client prove its token with no
    token passed; a consumer of the same pipe without it gets nothing."""

    class _Registry:  # the two calls a producer/consumer makes, and the token it carries
        token = TOKEN

        def create_pipe(self, *a: object) -> None: ...
        def register(self, **k: object) -> None: ...
        def keep_alive(self) -> None: ...

    with Producer("p", config=OPEN, registry=_Registry()) as prod:  # type: ignore[arg-type]
        cons = Consumer("p", [prod.address], group="g", config=TCP, registry=_Registry())  # type: ignore[arg-type]
        prod.wait_for_consumers()
        assert _stream(prod, cons, 3) == [0, 1, 2]
        outsider = Consumer("p", [prod.address], group="o", config=TCP)
        assert outsider.get(timeout_s=0.3) is None
        assert set(prod.groups()) == {"g"}
        cons.close()
        outsider.close()


def test_a_lane_connection_that_says_nothing_does_not_delay_the_others() -> None:
    lanes = LaneListener("127.0.0.1")
    silent = socket.create_connection(("127.0.0.1", lanes.port))
    try:
        token = lanes.expect(1)
        start = time.monotonic()
        ok = socket.create_connection(("127.0.0.1", lanes.port))
        ok.sendall(HELLO.pack(token, 0, 1))
        while lanes.take(token) is None:
            assert time.monotonic() - start < 2.0, "the silent connection blocked the listener"
            time.sleep(0.01)
        ok.close()
    finally:
        silent.close()
        lanes.close()
