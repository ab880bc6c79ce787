"""The bulk-channel factories: which channel a member (producer side) or a link (consumer side)
gets, and what a channel becomes after a nack. UCX is faked here (ucxx may be missing): these
tests check the selection, ``test_bulk.py`` moves real bytes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from step_infra.rpc import bulk_consumer, bulk_producer
from step_infra.rpc.bulk import BulkAsk
from step_infra.rpc.bulk_consumer import NOT_ASKED, FramesLink, LaneLink, UcxLink, link_channel
from step_infra.rpc.bulk_producer import (
    FramesChannel,
    LaneChannel,
    ProducerBulk,
    ShmChannel,
    UcxChannel,
)
from step_infra.rpc.messages import Hello, LanesOffer
from step_infra.rpc.producer import ProducerConfig
from step_infra.rpc.security import generate_keys
from step_infra.rpc.shm import shm_available
from step_infra.rpc.transport import make_transport

pytestmark = pytest.mark.timeout(30)


class _UcxTransport:
    """What the factories read of the ucx transport (making the real one needs ucxx)."""

    name = "ucx"
    bulk = ("ucx", "lanes")


class _FakeWorker:
    def close(self) -> None: ...


class _FakeSender:
    broken = False

    def __init__(self, worker: object, address: str) -> None:
        if address == "unreachable:1":
            raise RuntimeError("no route to unreachable")
        self.closed = False

    def close(self) -> None:
        self.closed = True


class _FakeReceiver:
    made = 0

    def __init__(self, host: str, pool_keep: int) -> None:
        _FakeReceiver.made += 1
        self.address = f"{host}:{1000 + _FakeReceiver.made}"
        self.broken: str | None = None

    def close(self) -> None:
        self.broken = "closed"


@pytest.fixture
def sock() -> Iterator[zmq.Socket[bytes]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    yield s
    s.close(linger=0)
    ctx.term()


def _hub(sock: zmq.Socket[bytes], transport: Any, **config: Any) -> ProducerBulk:
    return ProducerBulk("p", ProducerConfig(**{"shm": False, **config}), transport, sock)


def test_producer_picks_ucx_then_lanes_then_frames(
    monkeypatch: pytest.MonkeyPatch, sock: zmq.Socket[bytes]
) -> None:
    monkeypatch.setattr(bulk_producer, "UcxWorker", _FakeWorker)
    monkeypatch.setattr(bulk_producer, "UcxSender", _FakeSender)
    hub = _hub(sock, _UcxTransport(), lanes=2)
    sent: list[Any] = []
    try:
        ucx = hub.channel_for(b"m", Hello(group="g", ucx="10.0.0.1:7", lanes=4), sent.append)
        assert isinstance(ucx, UcxChannel) and isinstance(ucx.sender, _FakeSender)
        # an endpoint that cannot be made: zmq frames, and no lanes offered at once
        failed = hub.channel_for(b"m", Hello(group="g", ucx="unreachable:1", lanes=4), sent.append)
        assert isinstance(failed, FramesChannel) and sent == []
        lanes = hub.channel_for(b"m", Hello(group="g", lanes=4), sent.append)
        assert isinstance(lanes, LaneChannel) and lanes.sender is None  # offered, not connected
        assert [type(m) for m in sent] == [LanesOffer] and sent[0].n == 2  # the producer's max
        assert isinstance(hub.channel_for(b"m", Hello(group="g"), sent.append), FramesChannel)
        # after a nack: the channel closes, and the member gets lanes only if it asks again
        sender = ucx.sender
        assert isinstance(ucx.renew(0), FramesChannel) and sender.closed  # type: ignore[union-attr]
        assert isinstance(failed.renew(3), LaneChannel) and len(sent) == 2
        assert isinstance(lanes.renew(0), FramesChannel)
    finally:
        hub.close()


def test_lanes_are_never_offered_under_curve_nor_on_ipc(sock: zmq.Socket[bytes]) -> None:
    for hub in (
        _hub(sock, make_transport("tcp"), curve=generate_keys()),
        _hub(sock, make_transport("ipc")),
        _hub(sock, make_transport("tcp"), lanes=0),
    ):
        sent: list[Any] = []
        try:
            channel = hub.channel_for(b"m", Hello(group="g", lanes=4), sent.append)
            assert isinstance(channel, FramesChannel) and sent == []
            assert isinstance(channel.renew(4), FramesChannel) and sent == []
        finally:
            hub.close()


@pytest.mark.skipif(not shm_available(), reason="no writable /dev/shm")
def test_a_same_host_member_gets_shared_memory_and_keeps_it(sock: zmq.Socket[bytes]) -> None:
    hub = _hub(sock, make_transport("tcp"), shm=True)
    sent: list[Any] = []
    try:
        assert hub.shm_endpoint is not None and hub.shm_endpoint.startswith("shm://")
        channel = hub.channel_for(b"m", Hello(group="g", shm=True, lanes=4), sent.append)
        assert isinstance(channel, ShmChannel) and sent == []  # no lanes for shm members
        assert channel.renew(4) is channel and sent == []
    finally:
        hub.close()
    # a producer without shm serves a member that asks for it over the network
    hub = _hub(sock, make_transport("tcp"), shm=False)
    try:
        assert hub.shm_endpoint is None
        channel = hub.channel_for(b"m", Hello(group="g", shm=True, lanes=4), sent.append)
        assert isinstance(channel, LaneChannel)
        channel.close()
    finally:
        hub.close()


KW: dict[str, Any] = {"pipe": "p", "pool_keep": 2, "max_item_bytes": 1 << 20, "max_items": 4}
OFFER = LanesOffer(port=9, token=bytes(16), n=1)


def test_consumer_picks_its_links_channel_from_the_address() -> None:
    tcp, ipc = make_transport("tcp"), make_transport("ipc")
    shm = link_channel(ipc, "ipc:///tmp/x.sock", shm=True, encrypted=False, lanes=4, **KW)
    assert isinstance(shm, FramesLink) and shm.shm and shm.ask() == BulkAsk(shm=True)
    lanes = link_channel(tcp, "tcp://[::1]:5", shm=False, encrypted=False, lanes=4, **KW)
    assert isinstance(lanes, LaneLink) and not lanes.shm and lanes.ask() == BulkAsk(lanes=4)
    assert not lanes.had_receiver and lanes.broke() == 4  # a nack asks for fresh lanes
    for plain in (
        link_channel(tcp, "tcp://127.0.0.1:5", shm=False, encrypted=True, lanes=4, **KW),
        link_channel(tcp, "tcp://127.0.0.1:5", shm=False, encrypted=False, lanes=0, **KW),
        link_channel(ipc, "ipc:///tmp/x.sock", shm=False, encrypted=False, lanes=4, **KW),
    ):
        assert isinstance(plain, FramesLink) and plain.ask() == BulkAsk()
        assert plain.offered(OFFER) == NOT_ASKED  # refused: an offence of the producer
    assert shm.offered(OFFER) == NOT_ASKED


def test_a_ucx_link_listens_before_its_hello_and_again_after_a_restart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bulk_consumer, "UcxReceiver", _FakeReceiver)
    link = link_channel(
        _UcxTransport(),
        "ucx://127.0.0.1:5",
        shm=False,
        encrypted=False,
        lanes=4,
        **KW,  # type: ignore[arg-type]
    )
    assert isinstance(link, UcxLink) and link.had_receiver
    first = link.ask().ucx
    assert first is not None and first.startswith("127.0.0.1:")
    assert link.offered(OFFER) == NOT_ASKED
    assert link.broke() == 0 and link.receiver is None  # frames until the producer restarts
    assert link.ask() == BulkAsk()
    link.restart()
    assert link.receiver is not None and link.ask().ucx not in (None, first)
    link.close()
