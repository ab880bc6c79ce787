"""The producer's bulk channels (one per consumer member) and the factory that picks them.

A member's hello says what it can take (``shm``, ``lanes``, ``ucx``: :class:`~step_infra.rpc.
bulk.BulkAsk`); :meth:`ProducerBulk.channel_for` is the one place that turns that, and what this
producer offers, into the member's :class:`~step_infra.rpc.bulk.BulkChannel`:

* :class:`ShmChannel`: a same-host member; every item's bytes go once into a shared-memory
  segment that all shm members read (:class:`ItemMemory` counts it against
  ``max_inflight_bytes``);
* :class:`UcxChannel`: large items' bytes as UCX tagged messages to the member's listener;
* :class:`LaneChannel`: large items' bytes over parallel plain TCP lanes, offered at once and
  waited for up to ``lane_wait_s`` (zmq frames are several times slower for 64 MiB items);
* :class:`FramesChannel`: every byte as zmq frames (lanes off, CURVE, or none asked for).

A channel that lost bytes is renewed on the member's ``nack``: it closes, the items go again as
frames, and the factory makes the channel to use next (fresh lanes when the member asks).
The producer's zmq socket is only touched on its caller's thread; the lane threads only touch
their own sockets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import uuid
from typing import TYPE_CHECKING, Any

import zmq

from step_infra.rpc.bulk import BulkChannel, BulkSender, Outgoing, SendFrames
from step_infra.rpc.lanes import LaneListener, LaneSender
from step_infra.rpc.messages import Hello, LanesOffer
from step_infra.rpc.shm import ShmPool, shm_address, shm_available
from step_infra.rpc.staging import StagingPool
from step_infra.rpc.ucx import UcxSender, UcxWorker
from step_infra.rpc.wire import frames_in_segment, shm_bytes, to_shm_frames

if TYPE_CHECKING:
    from collections.abc import Callable

    from step_infra.rpc.producer import ProducerConfig
    from step_infra.rpc.transport import Transport

log = logging.getLogger(__name__)


class ItemMemory:
    """What the producer holds for its unacknowledged items: the buffers of items without a
    shared-memory copy (the caller's tensors, or the pinned staging copies of its CUDA
    tensors), plus every segment mapped (in use or kept for reuse), plus the idle staging
    buffers kept for reuse. An item copied to a segment lets its other buffers go, so each
    item is held once."""

    def __init__(self, pool: ShmPool | None, staging: StagingPool | None = None) -> None:
        self.pool = pool
        self.staging = staging if staging is not None else StagingPool()
        self._unsegmented = 0  # bytes of items held as their own buffers (no shm copy)

    @property
    def held_bytes(self) -> int:
        """Bytes held: item buffers plus mapped segments plus idle staging buffers (a staging
        buffer in use is its item's bytes, counted once, as the item's)."""
        segments = self.pool.mapped_bytes if self.pool is not None else 0
        return self._unsegmented + segments + self.staging.idle_bytes

    def hold(self, item: Outgoing) -> None:
        """A new item's buffers are held until :meth:`forget`."""
        self._unsegmented += item.nbytes

    def shm_frames(self, item: Outgoing) -> list[Any]:
        """The item's shm header frame, copying its bytes to a segment on first use."""
        if item.shm_frames is None:
            assert self.pool is not None, "a shm channel on a producer without shm"
            item.segment = self.pool.acquire(shm_bytes(item.frames))
            item.shm_frames = to_shm_frames(item.frames, item.segment)
            # hold the bytes once: later sends (tcp members, resends) read the segment, and
            # the caller's tensors can go (max_inflight_bytes counts each item once)
            item.frames = frames_in_segment(item.frames, item.segment)
            item.flat = None
            self._unsegmented -= item.nbytes
        return item.shm_frames

    def forget(self, item: Outgoing) -> None:
        """The item was acknowledged by all its receivers: its memory is free."""
        if item.segment is None:
            self._unsegmented -= item.nbytes
        elif self.pool is not None:
            self.pool.release(item.segment)

    def trim(self) -> bool:
        """Unmap idle segments and free idle staging buffers; whether that freed anything."""
        freed = self.staging.trim()
        if self.pool is not None:
            freed += self.pool.trim()
        return freed > 0

    def close(self) -> None:
        """Unmap and unlink every segment."""
        if self.pool is not None:
            self.pool.close()


def _send_flat(seq: int, item: Outgoing, sender: BulkSender | None, out: SendFrames) -> bool:
    """The header announcing a flat payload, then its bytes over ``sender``; plain frames when
    there is no working sender."""
    if sender is None or sender.broken:
        return out(item.frames)
    head, buffers, offsets, total = item.flat_frames()
    if not out([head]):
        return False
    sender.send(seq, buffers, offsets, total)
    return True


class FramesChannel:
    """Every byte as zmq frames."""

    def __init__(self, hub: ProducerBulk, control: Callable[[Any], None]) -> None:
        self._hub = hub
        self._control = control

    @property
    def sender(self) -> BulkSender | None:
        return None

    def ready(self) -> bool:
        return True

    def send(self, seq: int, item: Outgoing, *, big: bool, out: SendFrames) -> bool:
        return out(item.frames)

    def resend(self, item: Outgoing, out: SendFrames) -> bool:
        return out(item.frames)

    def renew(self, lanes: int) -> BulkChannel:
        return self._hub.network(lanes, self._control)

    def close(self) -> None:
        pass


class ShmChannel:
    """A same-host member: headers over the ipc socket, bytes in a shared segment."""

    def __init__(self, memory: ItemMemory) -> None:
        self._memory = memory

    @property
    def sender(self) -> BulkSender | None:
        return None

    def ready(self) -> bool:
        return True

    def send(self, seq: int, item: Outgoing, *, big: bool, out: SendFrames) -> bool:
        return out(self._memory.shm_frames(item))

    def resend(self, item: Outgoing, out: SendFrames) -> bool:
        return out(self._memory.shm_frames(item))

    def renew(self, lanes: int) -> BulkChannel:
        return self  # shared memory has no connection to lose, and shm members take no lanes

    def close(self) -> None:
        pass


class _NetworkChannel:
    """What the ucx and lane channels share: a sender of large items' bytes (once there is
    one), re-sends as zmq frames, and fresh lanes or an endpoint after a failure."""

    def __init__(self, hub: ProducerBulk, control: Callable[[Any], None]) -> None:
        self._hub = hub
        self._control = control
        self._sender: BulkSender | None = None

    @property
    def sender(self) -> BulkSender | None:
        return self._sender

    def resend(self, item: Outgoing, out: SendFrames) -> bool:
        return out(item.frames)

    def renew(self, lanes: int) -> BulkChannel:
        self.close()
        return self._hub.network(lanes, self._control)

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None


class UcxChannel(_NetworkChannel):
    """Large items' bytes over an endpoint to the member's UCX listener."""

    def __init__(
        self, hub: ProducerBulk, sender: UcxSender, control: Callable[[Any], None]
    ) -> None:
        super().__init__(hub, control)
        self._sender = sender

    def ready(self) -> bool:
        return True

    def send(self, seq: int, item: Outgoing, *, big: bool, out: SendFrames) -> bool:
        return _send_flat(seq, item, self._sender if big else None, out)


class LaneChannel(_NetworkChannel):
    """Large items' bytes over ``lanes`` plain TCP connections, offered when made. Until all
    of them connected, a large item waits up to ``wait_s`` for them, then goes as frames."""

    def __init__(
        self,
        hub: ProducerBulk,
        listener: LaneListener,
        lanes: int,
        wait_s: float,
        control: Callable[[Any], None],
    ) -> None:
        super().__init__(hub, control)
        self._listener = listener
        self._wait_s = wait_s
        self._token: bytes | None = listener.expect(lanes)  # offered, not all connected yet
        self._offered = time.monotonic()
        control(LanesOffer(port=listener.port, token=self._token, n=lanes))

    def _take(self) -> BulkSender | None:
        """The lanes' sender, once all of them connected."""
        if self._sender is None and self._token is not None:
            socks = self._listener.take(self._token)
            if socks is not None:
                self._sender = LaneSender(socks)
                self._token = None
        return self._sender

    def ready(self) -> bool:
        if self._token is None:
            return True
        self._take()
        return self._token is None or time.monotonic() - self._offered > self._wait_s

    def send(self, seq: int, item: Outgoing, *, big: bool, out: SendFrames) -> bool:
        return _send_flat(seq, item, self._take() if big else None, out)

    def close(self) -> None:
        super().close()
        if self._token is not None:
            self._listener.forget(self._token)
            self._token = None


class ProducerBulk:
    """What one producer offers for items' bytes (its ipc endpoint and shared memory, a lane
    listener, a UCX worker) and the one place a member's channel is picked.

    Shared memory needs ``config.shm`` and a writable ``/dev/shm``; lanes need ``config.lanes``,
    no CURVE (lanes are not encrypted) and a transport whose :attr:`~step_infra.rpc.transport.
    Transport.bulk` names them; UCX a transport that names ``ucx``."""

    def __init__(
        self,
        pipe: str,
        config: ProducerConfig,
        transport: Transport,
        sock: zmq.Socket[bytes],
    ) -> None:
        self._pipe = pipe
        self._max_lanes = config.lanes
        self._lane_wait_s = config.lane_wait_s
        self.shm_endpoint: str | None = None  # published beside the transport's address
        self._ipc_path: str | None = None
        pool: ShmPool | None = None
        if config.shm and shm_available():
            # same-host consumers connect here and get payloads through shared memory
            ipc = f"ipc://{tempfile.gettempdir()}/steprpc-{uuid.uuid4().hex[:12]}.sock"
            sock.bind(ipc)
            self._ipc_path = ipc.removeprefix("ipc://")
            self.shm_endpoint = shm_address(ipc)
            pool = ShmPool(max_bytes=config.max_inflight_bytes)
        self.memory = ItemMemory(pool)
        self._lanes: LaneListener | None = None
        if config.lanes and config.curve is None and "lanes" in transport.bulk:
            self._lanes = LaneListener(config.host)
        self._ucx: UcxWorker | None = UcxWorker() if "ucx" in transport.bulk else None

    def channel_for(
        self, ident: bytes, hello: Hello, control: Callable[[Any], None]
    ) -> BulkChannel:
        """The channel of a member that just said ``hello`` (and was welcomed: an offer of
        lanes goes out through ``control`` now)."""
        if hello.shm and self.memory.pool is not None:
            return ShmChannel(self.memory)
        if self._ucx is not None and hello.ucx is not None:
            try:
                return UcxChannel(self, UcxSender(self._ucx, hello.ucx), control)
            except Exception as exc:  # ucxx raises its own error types
                log.warning("pipe %s: no ucx endpoint to %r (%s)", self._pipe, ident, exc)
                return FramesChannel(self, control)
        return self.network(hello.lanes, control)

    def network(self, lanes: int, control: Callable[[Any], None]) -> BulkChannel:
        """A channel over the network: lanes when asked for and offered, else zmq frames."""
        if lanes > 0 and self._lanes is not None:
            n = min(lanes, self._max_lanes)
            return LaneChannel(self, self._lanes, n, self._lane_wait_s, control)
        return FramesChannel(self, control)

    def close(self) -> None:
        """Close the listener and the worker, unmap the segments, remove the ipc path (after
        the producer closed every member's channel and its socket)."""
        if self._lanes is not None:
            self._lanes.close()
        if self._ucx is not None:
            self._ucx.close()
        self.memory.close()
        if self._ipc_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._ipc_path)
