"""Bulk lanes: the tensor bytes of large items striped over several plain TCP connections.

Why: one zmq connection moves a message through one I/O thread with non-blocking
``send``/``recv`` calls woken by epoll, into a fresh allocation per message (page faults on
every 64 MiB item). On this host's loopback that caps a 64 MiB item at about 1.8 GiB/s. Blocking
``sendall``/``recv_into`` on K connections in parallel, into reused receive buffers, moves the
same item at about 3-4 GiB/s. pyzmq cannot receive into a caller's buffer, so this part is
written by hand: zmq still carries everything else on the link (hello, credits, acks,
heartbeats and the item's header, in order); only the buffers of items of at least
``lane_min_bytes`` take the lanes.

Protocol. A consumer's hello asks for ``lanes`` connections; the producer answers over zmq with
the port of its :class:`LaneListener` and a random token; the consumer opens the connections,
each presenting ``token + lane index``. For a lane item the producer sends the header over zmq
(``flat``: payload size, ``offs``: 64-byte aligned tensor offsets in one flat buffer) and hands
each lane a contiguous stripe of that flat buffer, each prefixed by a :data:`STRIPE` record
(seq, total, offset, length). The consumer's lane threads receive each stripe straight into
the item's flat buffer; the consumer's main thread waits for the buffer when the trainer takes
the item. Lanes are plain TCP: a link with CURVE encryption never uses them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from step_infra.rpc.messages import ItemHeader

log = logging.getLogger(__name__)

MAGIC = b"SRL1"
STRIPE = struct.Struct("<4sIQQQQ")  # magic, lane, seq, total bytes, offset, length
HELLO = struct.Struct("<16sII")  # token, lane index, lanes
ALIGN = 64  # wire.flat_layout aligns tensors to this
_ZEROS = memoryview(bytes(ALIGN))
_SOCK_BUF = 4 << 20
HELLO_TIMEOUT_S = 5.0  # a lane connection must present its token within this
MAX_PENDING_LANES = 256  # connections accepted but not yet identified


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCK_BUF)


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < view.nbytes:
        n = sock.recv_into(view[got:], view.nbytes - got, socket.MSG_WAITALL)
        if n == 0:
            raise ConnectionError("lane closed by peer")
        got += n


# ------------------------------------------------------------------------------ producer
class LaneListener:
    """Producer side: accepts lane connections and groups them by the token they present."""

    def __init__(self, host: str) -> None:
        self._sock = socket.create_server((host, 0))
        self._sock.setblocking(False)
        self.port: int = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._expected: dict[bytes, list[socket.socket | None]] = {}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="steprpc-lanes", daemon=True)
        self._thread.start()

    def expect(self, lanes: int) -> bytes:
        """A fresh token for ``lanes`` connections to come."""
        token = os.urandom(16)
        with self._lock:
            self._expected[token] = [None] * lanes
        return token

    def take(self, token: bytes) -> list[socket.socket] | None:
        """The connections presenting ``token``, once all of them arrived."""
        with self._lock:
            socks = self._expected.get(token)
            if socks is None or any(s is None for s in socks):
                return None
            del self._expected[token]
        return [s for s in socks if s is not None]

    def forget(self, token: bytes) -> None:
        """Drop a token and close whatever connected with it."""
        with self._lock:
            socks = self._expected.pop(token, None) or []
        for s in socks:
            if s is not None:
                s.close()

    def close(self) -> None:
        """Stop accepting and close pending connections."""
        self._closed.set()
        self._thread.join(2)
        self._sock.close()
        with self._lock:
            pending = [s for socks in self._expected.values() for s in socks if s is not None]
            self._expected.clear()
        for s in pending:
            s.close()

    def _accept_loop(self) -> None:
        """Accept connections and read their hellos without blocking on any one of them: a
        peer that connects and says nothing is closed after ``HELLO_TIMEOUT_S`` and never
        delays the lanes of others."""
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ)
        pending: dict[socket.socket, tuple[float, bytearray]] = {}
        try:
            while not self._closed.is_set():
                for key, _ in sel.select(0.2):
                    if key.fileobj is self._sock:
                        self._accept(sel, pending)
                    else:
                        self._read_hello(sel, pending, key.fileobj)  # type: ignore[arg-type]
                now = time.monotonic()
                for conn in [c for c, (t, _) in pending.items() if now - t > HELLO_TIMEOUT_S]:
                    log.warning("lanes: closed a connection that sent no hello")
                    sel.unregister(conn)
                    del pending[conn]
                    conn.close()
        finally:
            for conn in pending:
                conn.close()
            sel.close()

    def _accept(
        self, sel: selectors.BaseSelector, pending: dict[socket.socket, tuple[float, bytearray]]
    ) -> None:
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, TimeoutError):
            return
        except OSError:
            self._closed.set()  # the listener was closed
            return
        if len(pending) >= MAX_PENDING_LANES:
            conn.close()  # a flood of connections that say nothing: refuse, keep the rest
            return
        conn.setblocking(False)
        pending[conn] = (time.monotonic(), bytearray())
        sel.register(conn, selectors.EVENT_READ)

    def _read_hello(
        self,
        sel: selectors.BaseSelector,
        pending: dict[socket.socket, tuple[float, bytearray]],
        conn: socket.socket,
    ) -> None:
        _, got = pending[conn]
        try:
            chunk = conn.recv(HELLO.size - len(got))
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        got += chunk
        if chunk and len(got) < HELLO.size:
            return
        sel.unregister(conn)
        del pending[conn]
        if len(got) < HELLO.size:
            conn.close()
            return
        token, lane, lanes = HELLO.unpack(got)
        with self._lock:
            socks = self._expected.get(token)
            ok = socks is not None and lane < len(socks) == lanes and socks[lane] is None
            if ok:
                conn.setblocking(True)
                _tune(conn)
                socks[lane] = conn  # type: ignore[index]
        if not ok:
            log.warning("lanes: refused a connection with an unknown token or lane")
            conn.close()


@dataclass(slots=True)
class _Job:
    seq: int
    total: int
    start: int
    stop: int
    segments: list[tuple[int, memoryview]]


class LaneSender:
    """Producer side, one per consumer member: one thread per lane sends its stripes in order."""

    def __init__(self, socks: Sequence[socket.socket]) -> None:
        self._socks = list(socks)
        self._queues: list[queue.SimpleQueue[_Job | None]] = [queue.SimpleQueue() for _ in socks]
        self.broken = False
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"steprpc-lane{i}", daemon=True)
            for i in range(len(socks))
        ]
        for t in self._threads:
            t.start()

    @property
    def lanes(self) -> int:
        """Number of connections."""
        return len(self._socks)

    def send(
        self, seq: int, buffers: Sequence[memoryview], offsets: Sequence[int], total: int
    ) -> None:
        """Queue one item's buffers (laid out at ``offsets``); they must stay alive until acked."""
        segments: list[tuple[int, memoryview]] = []
        for off, buf in zip(offsets, buffers, strict=True):
            view = memoryview(buf).cast("B")
            segments.append((off, view))
            pad = (-view.nbytes) % ALIGN
            if pad:
                segments.append((off + view.nbytes, _ZEROS[:pad]))
        part = -(-total // len(self._socks))
        part = -(-part // 4096) * 4096
        for i, q in enumerate(self._queues):
            start, stop = i * part, min(total, (i + 1) * part)
            if start < stop:
                q.put(_Job(seq, total, start, stop, segments))

    def close(self) -> None:
        """Stop the threads and close the connections."""
        for q in self._queues:
            q.put(None)
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _run(self, lane: int) -> None:
        sock = self._socks[lane]
        q = self._queues[lane]
        while True:
            job = q.get()
            if job is None:
                return
            try:
                self._send(sock, lane, job)
            except OSError as exc:
                if not self.broken:
                    log.warning("lanes: lane %d to a consumer failed: %s", lane, exc)
                self.broken = True
                # the consumer learns at once (its receive threads fail) and asks for the
                # items again, instead of waiting for the lane timeout
                for s in self._socks:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                return
            finally:
                del job  # hold no item's buffers while idle: the producer frees them on ack

    @staticmethod
    def _send(sock: socket.socket, lane: int, job: _Job) -> None:
        sock.sendall(STRIPE.pack(MAGIC, lane, job.seq, job.total, job.start, job.stop - job.start))
        for off, view in job.segments:
            lo, hi = max(off, job.start), min(off + view.nbytes, job.stop)
            if lo < hi:
                sock.sendall(view[lo - off : hi - off])


# ------------------------------------------------------------------------------ consumer
@dataclass(slots=True)
class _Flat:
    buf: np.ndarray
    total: int
    received: int = 0
    discard: bool = False


class BufferPool:
    """Receive buffers reused once nothing references them any more (no page faults, no
    zeroing of fresh memory per item). A buffer is free when the pool holds the only reference:
    tensors made from it keep it referenced until they are gone. ``pin``: page-locked buffers
    (a consumer that puts tensors on its CUDA device copies from them without a bounce)."""

    def __init__(self, keep: int = 8, *, pin: bool = False) -> None:
        self._keep = keep
        self._pin = pin
        self._bufs: list[np.ndarray] = []

    def get(self, nbytes: int) -> np.ndarray:
        """A buffer of at least ``nbytes`` bytes that nobody else holds."""
        for buf in self._bufs:
            # references: the list, the loop variable and getrefcount's argument
            if nbytes <= buf.nbytes <= 2 * nbytes + (1 << 20) and sys.getrefcount(buf) <= 3:
                return buf
        buf = self._allocate(max(nbytes, 1))
        if len(self._bufs) < self._keep:
            self._bufs.append(buf)
        else:  # replace one that is free, if any, so the pool follows the item sizes
            for i, old in enumerate(self._bufs):
                if sys.getrefcount(old) <= 3:
                    self._bufs[i] = buf
                    break
        return buf

    def _allocate(self, nbytes: int) -> np.ndarray:
        if not self._pin:
            return np.empty(nbytes, dtype=np.uint8)
        import torch  # only a consumer with a CUDA device asks for pinned buffers

        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()


class FlatAssembler:
    """Consumer side, shared by the bulk receivers: items' flat buffers filled by background
    threads, waited for by the consumer's thread. At most ``max_items`` items of at most
    ``max_bytes`` each may be on the way at once: a stripe announcing more is a broken link
    (``ValueError``), never an allocation."""

    def __init__(
        self,
        pool_keep: int = 8,
        *,
        max_bytes: int = 1 << 34,
        max_items: int = 64,
        pin: bool = False,
    ) -> None:
        self._cond = threading.Condition()
        self._items: dict[int, _Flat] = {}
        self._pool = BufferPool(pool_keep, pin=pin)
        self._max_bytes = max_bytes
        self._max_items = max_items
        self.broken: str | None = None

    def buffer(self, seq: int, total: int) -> np.ndarray:
        """The flat buffer of item ``seq`` (made on first use)."""
        with self._cond:
            return self._entry(seq, total).buf

    def filled(self, seq: int, nbytes: int) -> None:
        """``nbytes`` more of item ``seq`` arrived."""
        with self._cond:
            entry = self._items.get(seq)
            if entry is None:
                return
            entry.received += nbytes
            if entry.received >= entry.total:
                if entry.discard:
                    del self._items[seq]
                self._cond.notify_all()

    def fail(self, reason: str) -> None:
        """The link broke: every waiter gives up."""
        with self._cond:
            if self.broken is None:
                self.broken = reason
            self._cond.notify_all()

    def wait(self, seq: int, total: int, timeout_s: float) -> memoryview | None:
        """Item ``seq``'s ``total`` bytes once all arrived; ``None`` on timeout or a broken link
        (:attr:`broken` says which)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            entry = self._entry(seq, total)
            while entry.received < entry.total and self.broken is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            if entry.received < entry.total:
                self._items.pop(seq, None)
                return None
            del self._items[seq]
        return memoryview(entry.buf)[:total]  # type: ignore[arg-type]

    def discard(self, seq: int, total: int) -> None:
        """Item ``seq`` is not wanted (a duplicate): drop its bytes once they arrived."""
        with self._cond:
            entry = self._entry(seq, total)
            if entry.received >= entry.total:
                del self._items[seq]
            else:
                entry.discard = True

    def _entry(self, seq: int, total: int) -> _Flat:
        entry = self._items.get(seq)
        if entry is None:
            if total > self._max_bytes:
                raise ValueError(
                    f"item {seq}: {total} bytes announced; at most {self._max_bytes} accepted"
                )
            if len(self._items) >= self._max_items:
                raise ValueError(f"item {seq}: {len(self._items)} items already on the way")
            entry = _Flat(self._pool.get(total), total)
            self._items[seq] = entry
        elif entry.total != total:
            raise ValueError(f"item {seq}: {total} bytes, where {entry.total} were announced")
        return entry


class LaneReceiver:
    """Consumer side, one per producer link: ``lanes`` connections, one thread each."""

    def __init__(
        self,
        host: str,
        port: int,
        token: bytes,
        lanes: int,
        connect_timeout_s: float = 5.0,
        pool_keep: int = 8,
        max_item_bytes: int = 1 << 34,
        max_items: int = 64,
        pin: bool = False,
    ) -> None:
        self.assembler = FlatAssembler(
            pool_keep, max_bytes=max_item_bytes, max_items=max_items, pin=pin
        )
        self._socks: list[socket.socket] = []
        try:
            for i in range(lanes):
                sock = socket.create_connection((host, port), timeout=connect_timeout_s)
                sock.settimeout(None)
                _tune(sock)
                sock.sendall(HELLO.pack(token, i, lanes))
                self._socks.append(sock)
        except OSError:
            self.close()
            raise
        self._threads = [
            threading.Thread(target=self._run, args=(s,), name="steprpc-lane-rx", daemon=True)
            for s in self._socks
        ]
        for t in self._threads:
            t.start()

    @property
    def broken(self) -> str | None:
        """Why the lanes stopped working, or ``None``."""
        return self.assembler.broken

    def expect(self, seq: int, total: int, header: ItemHeader) -> None:
        """Item ``seq``'s header arrived (its stripes fill the buffer on their own)."""
        self.assembler.buffer(seq, total)

    def wait(self, seq: int, total: int, timeout_s: float) -> memoryview | None:
        """Item ``seq``'s flat bytes once all stripes arrived; ``None`` on timeout or failure."""
        return self.assembler.wait(seq, total, timeout_s)

    def discard(self, seq: int, total: int, header: ItemHeader) -> None:
        """Item ``seq`` is a duplicate: drop its bytes once they arrived."""
        self.assembler.discard(seq, total)

    def close(self) -> None:
        """Close the connections (their threads end) and wake any waiter."""
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.assembler.fail("closed")

    def _run(self, sock: socket.socket) -> None:
        head = bytearray(STRIPE.size)
        try:
            while True:
                _recv_exact(sock, memoryview(head))
                magic, _lane, seq, total, offset, length = STRIPE.unpack(head)
                if magic != MAGIC or offset + length > total:
                    raise ConnectionError(f"bad stripe record {bytes(head)!r}")
                buf = self.assembler.buffer(seq, total)
                _recv_exact(sock, memoryview(buf)[offset : offset + length])  # type: ignore[arg-type]
                self.assembler.filled(seq, length)
        except Exception as exc:  # whatever it was, the link is broken; the thread ends cleanly
            self.assembler.fail(f"{type(exc).__name__}: {exc}")
