"""Data-plane transports behind one small interface.

A :class:`Transport` makes the two zmq sockets of a link: the producer's ROUTER (one per
producer, consumers address it) and a consumer's DEALER (one per producer it reads from, so
credits and acks reach the right producer). ``tcp`` works across hosts (large items' bytes
take parallel lanes, ``lanes.py``); ``ipc`` (a Unix socket, same host only) skips the TCP
stack; ``ucx`` is tcp for control and headers plus UCX for large items' bytes (``ucx.py``).
Same-host shared memory (``shm.py``) rides on ``ipc``. Sockets never drop silently (HWM 0:
credits bound what is queued) and close with ``linger=0``.

Each transport also names the bulk channels that may carry its links' large items
(:attr:`Transport.bulk`, preferred first): the producer's and the consumer's channel factories
(``bulk_producer.py``, ``bulk_consumer.py``) read that instead of the transport's name.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import zmq

# bulk channels a link's large items may take besides zmq frames (see bulk.py)
BulkKind = Literal["lanes", "ucx"]


class Transport(Protocol):
    """Makes the sockets of one link."""

    @property
    def name(self) -> str:
        """The transport's name (``tcp``, ``ipc``, ``ucx``)."""
        ...

    @property
    def bulk(self) -> tuple[BulkKind, ...]:
        """Bulk channels that can reach this transport's peers, preferred first (empty: every
        byte as zmq frames)."""
        ...

    def bind(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        host: str,
        port: int = 0,
        options: Mapping[int, Any] | None = None,
    ) -> tuple[zmq.Socket[bytes], str]:
        """A bound ROUTER socket and the address consumers connect to (port 0: any free)."""
        ...

    def connect(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        address: str,
        identity: bytes,
        options: Mapping[int, Any] | None = None,
    ) -> zmq.Socket[bytes]:
        """A DEALER socket with ``identity`` connected to ``address``."""
        ...


def _tune(sock: zmq.Socket[bytes], options: Mapping[int, Any] | None = None) -> None:
    """Extra ``options`` (e.g. CURVE keys) are set before bind/connect, as zmq requires."""
    for opt, value in (options or {}).items():
        sock.setsockopt(opt, value)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)


def _router(
    ctx: zmq.Context[zmq.Socket[bytes]], options: Mapping[int, Any] | None
) -> zmq.Socket[bytes]:
    """The producer side of every zmq transport: a ROUTER that fails loudly on unknown peers."""
    sock = ctx.socket(zmq.ROUTER)
    _tune(sock, options)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    return sock


def _connect_dealer(
    ctx: zmq.Context[zmq.Socket[bytes]],
    address: str,
    identity: bytes,
    options: Mapping[int, Any] | None,
) -> zmq.Socket[bytes]:
    """The consumer side of every zmq transport: a DEALER with ``identity``."""
    sock = ctx.socket(zmq.DEALER)
    _tune(sock, options)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(address)
    return sock


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpTransport:
    """pyzmq over TCP with zero-copy frames."""

    name: str = "tcp"
    bulk: tuple[BulkKind, ...] = ("lanes",)  # plain TCP reaches wherever zmq tcp does

    def bind(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        host: str,
        port: int = 0,
        options: Mapping[int, Any] | None = None,
    ) -> tuple[zmq.Socket[bytes], str]:
        sock = _router(ctx, options)
        if port:
            sock.bind(f"tcp://{host}:{port}")  # a fixed port lets a restarted producer be found
        else:
            port = sock.bind_to_random_port(f"tcp://{host}")
        return sock, f"tcp://{host}:{port}"

    def connect(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        address: str,
        identity: bytes,
        options: Mapping[int, Any] | None = None,
    ) -> zmq.Socket[bytes]:
        return _connect_dealer(ctx, address, identity, options)


@dataclass(frozen=True, slots=True, kw_only=True)
class IpcTransport:
    """pyzmq over a Unix-domain socket: same host only."""

    name: str = "ipc"
    bulk: tuple[BulkKind, ...] = ()  # same host: shm (shm.py) rides on it, not a bulk channel

    def bind(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        host: str,
        port: int = 0,
        options: Mapping[int, Any] | None = None,
    ) -> tuple[zmq.Socket[bytes], str]:
        sock = _router(ctx, options)
        path = os.path.join(tempfile.gettempdir(), f"steprpc-{uuid.uuid4().hex[:12]}.sock")
        address = f"ipc://{path}"
        sock.bind(address)
        return sock, address

    def connect(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        address: str,
        identity: bytes,
        options: Mapping[int, Any] | None = None,
    ) -> zmq.Socket[bytes]:
        return _connect_dealer(ctx, address, identity, options)


@dataclass(frozen=True, slots=True, kw_only=True)
class UcxTransport:
    """UCX through ucxx (extra ``[rdma]``): the link's control path and item headers over zmq
    tcp, large items' tensor bytes as UCX tagged messages (RDMA where a device exists; see
    ``ucx.py``). Its address scheme ``ucx://`` tells consumers the producer offers UCX.
    Making it raises ``ValueError`` naming the package when ucxx cannot load."""

    name: str = "ucx"
    bulk: tuple[BulkKind, ...] = ("ucx", "lanes")  # lanes: members without ucxx connect as tcp

    def __post_init__(self) -> None:
        from step_infra.rpc.ucx import require_ucx

        require_ucx()

    def bind(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        host: str,
        port: int = 0,
        options: Mapping[int, Any] | None = None,
    ) -> tuple[zmq.Socket[bytes], str]:
        sock, address = TcpTransport().bind(ctx, host, port, options)
        return sock, "ucx://" + address.removeprefix("tcp://")

    def connect(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        address: str,
        identity: bytes,
        options: Mapping[int, Any] | None = None,
    ) -> zmq.Socket[bytes]:
        return _connect_dealer(ctx, "tcp://" + address.split("://", 1)[1], identity, options)


def recv_bounded(sock: zmq.Socket[bytes], max_frames: int) -> tuple[list[zmq.Frame], int]:
    """One multipart message without copying: its first ``max_frames`` frames and how many it
    had (a peer's surplus frames are read and let go, never held)."""
    frames: list[zmq.Frame] = []
    count = 0
    while True:
        part = sock.recv(copy=False)
        count += 1
        if len(frames) < max_frames:
            frames.append(part)
        if not part.more:
            return frames, count


def make_transport(name: str) -> Transport:
    """The transport called ``name`` (``tcp``, ``ipc`` or ``ucx``)."""
    if name == "tcp":
        return TcpTransport()
    if name == "ipc":
        return IpcTransport()
    if name == "ucx":
        return UcxTransport()
    raise ValueError(f"transport {name!r} is not available; expected 'tcp', 'ipc' or 'ucx'")


def transport_for(address: str) -> Transport:
    """The transport that reaches ``address`` (by its scheme)."""
    return make_transport(address.split("://", 1)[0])
