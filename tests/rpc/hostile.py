"""Peers that misbehave on purpose, for the hostile-peer and fuzz tests: a raw zmq DEALER that
sends whatever it is told to a real producer, and a fake producer (a ROUTER the test binds)
that sends whatever it is told to a real consumer. Both speak msgpack by hand, not through
step_infra's message types, so they can say what those types would refuse to build."""

from __future__ import annotations

import time
from typing import Any

import msgpack
import zmq

from step_infra.rpc.producer import Producer


def pack(msg: Any) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


class RawPeer:
    """A DEALER connected to a producer's tcp endpoint, with a chosen identity."""

    def __init__(self, producer: Producer, identity: bytes = b"rogue/0") -> None:
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.connect(producer.address.split(";")[0])

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def received(self, producer: Producer, wait_s: float = 0.3) -> list[list[bytes]]:
        """What the producer sent back while it was polled for ``wait_s``."""
        out: list[list[bytes]] = []
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            producer.poll(10)
            while self.sock.poll(0):
                out.append(self.sock.recv_multipart())
        return out

    def close(self) -> None:
        self.sock.close(0)
        self._ctx.term()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FakeProducer:
    """A ROUTER that a real consumer connects to; the test decides every frame it sends."""

    def __init__(self) -> None:
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.member: bytes | None = None
        self.inbox: list[dict[str, Any]] = []

    def wait_hello(self, timeout_s: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for msg in self.read(0.05):
                if msg.get("k") == "hello":
                    return msg
        raise TimeoutError("the consumer never said hello")

    def read(self, wait_s: float) -> list[dict[str, Any]]:
        """Control messages from the consumer (its identity is remembered)."""
        got: list[dict[str, Any]] = []
        if self.sock.poll(int(wait_s * 1000)):
            while self.sock.poll(0):
                frames = self.sock.recv_multipart()
                self.member = frames[0]
                msg = msgpack.unpackb(frames[1], raw=False)
                got.append(msg)
        self.inbox.extend(got)
        return got

    def send(self, *frames: bytes | memoryview) -> None:
        assert self.member is not None, "no consumer has said hello"
        self.sock.send_multipart([self.member, *frames])

    def close(self) -> None:
        self.sock.close(0)
        self._ctx.term()

    def __enter__(self) -> FakeProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def item_header(seq: int = 0, **fields: Any) -> dict[str, Any]:
    """A well-formed item header of one float32 tensor of 4 elements, with ``fields`` changed."""
    head = {
        "v": 1,
        "k": "item",
        "pipe": "p",
        "prod": "F",
        "seq": seq,
        "names": ["x"],
        "dtypes": ["float32"],
        "shapes": [[4]],
        "meta": {},
    }
    head.update(fields)
    return head
