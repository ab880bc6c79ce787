"""The ``ucx`` transport's bulk channel: tensor bytes over UCX (RDMA where a device exists).

A ``ucx`` link is a tcp link whose large items' bytes take UCX instead of zmq frames or lanes:
zmq keeps the control path and the item headers (in order, as for every transport), and the
tensor buffers travel as UCX tagged messages, one per tensor, tag ``seq << 12 | index``. UCX
picks its own transports (RDMA verbs, CUDA IPC, shared memory, TCP); ``UCX_TLS=tcp`` pins
TCP, as the tests do on hosts without RDMA. The consumer listens (one UCX worker and listener
per producer link) and names its address in its hello; the producer opens an endpoint to it,
so it knows which endpoint belongs to which member without a handshake of its own.

ucxx (PyPI ``ucxx-cu12`` / ``ucxx-cu11``, the ``[rdma]`` extra) is imported only when a ucx link
is made; where it cannot load, :func:`ucx_unavailable` says why and making the transport raises
an error naming the package. Workers run ucxx's C++ progress thread, so Python only posts
requests and polls their completion (no asyncio, no Python thread touches UCX state).
Host tensors only: CUDA tensors are staged through host memory like on every transport.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from step_infra.rpc.lanes import BufferPool
from step_infra.rpc.messages import ItemHeader

log = logging.getLogger(__name__)

UCXX_HINT = (
    "the ucx transport needs ucxx: pip install 'step-infra[rdma]' "
    "(PyPI package ucxx-cu12, or ucxx-cu11 for CUDA 11)"
)
TAG_BITS = 12  # tensor index bits in a tag; wire.MAX_TENSORS is 4096


def ucx_unavailable() -> str | None:
    """Why ucxx cannot be used on this host, or ``None`` when it can."""
    try:
        import ucxx._lib.libucxx  # noqa: F401
        from ucxx._lib.arr import Array  # noqa: F401
    except Exception as exc:  # ImportError, or OSError/RuntimeError from its native libraries
        return f"{UCXX_HINT} ({type(exc).__name__}: {exc})"
    return None


def require_ucx() -> None:
    """Raise ``ValueError`` naming the package when ucxx cannot load."""
    why = ucx_unavailable()
    if why is not None:
        raise ValueError(why)


def _tag(seq: int, index: int) -> Any:
    from ucxx._lib.libucxx import UCXXTag

    return UCXXTag((seq << TAG_BITS) | index)


class UcxWorker:
    """One UCX context and worker with its progress thread."""

    def __init__(self) -> None:
        require_ucx()
        import ucxx._lib.libucxx as ucx_api

        self.api = ucx_api
        self.context = ucx_api.UCXContext(
            feature_flags=(ucx_api.Feature.TAG, ucx_api.Feature.WAKEUP)
        )
        self.worker = ucx_api.UCXWorker(self.context)
        self.worker.start_progress_thread(polling_mode=False, epoll_timeout=100)
        self._closed = False

    def close(self) -> None:
        """Cancel what is in flight and stop the progress thread."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.worker.cancel_inflight_requests()
        with contextlib.suppress(Exception):
            self.worker.stop_progress_thread()


def _array(view: memoryview) -> Any:
    from ucxx._lib.arr import Array

    return Array(np.frombuffer(view, dtype=np.uint8))


# ------------------------------------------------------------------------------ producer
class UcxSender:
    """Producer side, one per consumer member: an endpoint to the member's listener."""

    def __init__(self, worker: UcxWorker, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._worker = worker
        self._ep = worker.api.UCXEndpoint.create(worker.worker, host, int(port), True)
        self._inflight: list[tuple[Any, memoryview]] = []  # keep buffers alive until sent
        self.broken = False

    def send(
        self, seq: int, buffers: Sequence[memoryview], offsets: Sequence[int], total: int
    ) -> None:
        """Post one tagged message per non-empty tensor buffer (no copy)."""
        del offsets, total  # the receiver places each tensor itself
        self._reap()
        for i, buf in enumerate(buffers):
            if buf.nbytes:
                self._inflight.append((self._ep.tag_send(_array(buf), _tag(seq, i)), buf))

    def _reap(self) -> None:
        keep = []
        for req, buf in self._inflight:
            if not req.completed:
                keep.append((req, buf))
                continue
            try:
                req.check_error()
            except Exception as exc:
                if not self.broken:
                    log.warning("ucx: send to a consumer failed: %s", exc)
                self.broken = True
        self._inflight = keep

    def close(self) -> None:
        """Close the endpoint (requests still in flight are cancelled)."""
        with contextlib.suppress(Exception):
            self._ep.close_blocking()
        self._inflight.clear()


# ------------------------------------------------------------------------------ consumer
def local_address_towards(host: str) -> str:
    """This host's address on the route to ``host`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


class UcxReceiver:
    """Consumer side, one per producer link: a UCX listener the producer connects to, and
    tagged receives posted straight into each item's flat buffer."""

    def __init__(self, producer_host: str, pool_keep: int = 8) -> None:
        self._w = UcxWorker()
        self._eps: list[Any] = []
        self._listener = self._w.api.UCXListener.create(
            self._w.worker, 0, self._eps.append, deliver_endpoint=True
        )
        self.address = f"{local_address_towards(producer_host)}:{self._listener.port}"
        self._pool = BufferPool(pool_keep)
        self._items: dict[int, tuple[np.ndarray, list[Any], int]] = {}
        self._discarded: list[tuple[np.ndarray, list[Any]]] = []
        self.broken: str | None = None

    def expect(self, seq: int, total: int, header: ItemHeader) -> None:
        """Post the receives of item ``seq`` (its header announced ``total`` flat bytes)."""
        if seq in self._items:
            return
        offs, sizes = header.offs, header.sizes
        if offs is None or sizes is None or len(offs) != len(sizes):
            raise ValueError(f"item {seq}: header lacks tensor offsets/sizes")
        buf = self._pool.get(total)
        view = memoryview(buf)  # type: ignore[arg-type]
        reqs = []
        for i, (off, n) in enumerate(zip(offs, sizes, strict=True)):
            if not (
                isinstance(off, int)
                and isinstance(n, int)
                and off >= 0
                and n >= 0
                and off + n <= total
            ):
                raise ValueError(f"item {seq}: tensor {i} at {off!r}+{n!r} outside {total}")
            if n:
                reqs.append(self._w.worker.tag_recv(_array(view[off : off + n]), _tag(seq, i)))
        self._items[seq] = (buf, reqs, total)

    def wait(self, seq: int, total: int, timeout_s: float) -> memoryview | None:
        """Item ``seq``'s flat bytes once every tensor arrived; ``None`` on timeout."""
        entry = self._items.get(seq)
        if entry is None:
            return None
        buf, reqs, _ = entry
        deadline = time.monotonic() + timeout_s
        pause = 20e-6
        while not all(r.completed for r in reqs):
            if self.broken is not None or time.monotonic() > deadline:
                return None
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        del self._items[seq]
        try:
            for r in reqs:
                r.check_error()
        except Exception as exc:
            self.broken = f"ucx receive failed: {exc}"
            return None
        return memoryview(buf)[:total]  # type: ignore[arg-type]

    def discard(self, seq: int, total: int, header: ItemHeader) -> None:
        """Item ``seq`` is a duplicate: receive its bytes (so UCX does not hold them) and drop."""
        self.expect(seq, total, header)
        buf, reqs, _ = self._items.pop(seq)
        self._discarded = [(b, rs) for b, rs in self._discarded if not all(r.completed for r in rs)]
        self._discarded.append((buf, reqs))

    def close(self) -> None:
        """Cancel pending receives, close endpoints and stop the worker."""
        self.broken = self.broken or "closed"
        for ep in self._eps:
            with contextlib.suppress(Exception):
                ep.close_blocking()
        self._w.close()
        self._items.clear()
        self._discarded.clear()
