"""The receiving end of a pipe: an iterator of items, exactly once to the training loop.

A consumer is one member of one group. It connects a DEALER to each producer address, says
hello with ``prefetch`` credits, and hands items to the caller in arrival order (so one
producer's items arrive in order). Taking the next item returns the previous one's credit and,
by default, acknowledges it: the producer only forgets an item once the trainer moved past it
(``ack="manual"`` defers the acknowledgement to :meth:`Consumer.acknowledge`, e.g. until a
checkpoint covers the item).
Duplicates (by ``(producer, seq)``) are dropped; :meth:`Consumer.position` reports what was
consumed so a restarted job resumes where it stopped. Memory is bounded by ``prefetch``
items per producer link. Malformed frames are counted, logged and dropped.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from step_infra.rpc.lanes import LaneReceiver
from step_infra.rpc.security import client_options
from step_infra.rpc.shm import ShmReader, select_endpoint
from step_infra.rpc.stats import PipeStats
from step_infra.rpc.transport import transport_for
from step_infra.rpc.ucx import UcxReceiver, ucx_unavailable
from step_infra.rpc.wire import Item, WireError, decode_header, decode_item, flat_size

if TYPE_CHECKING:
    from step_infra.rpc.registry import RegistryClient

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsumerConfig:
    """How a consumer receives."""

    prefetch: int = 4
    transport: str | None = None  # None: shm when the producer is on this host, else tcp
    curve_server_key: bytes | None = None  # the producer's CURVE public key, if it encrypts
    heartbeat_s: float = 1.0
    timeout_s: float | None = None
    # "take": taking the next item acknowledges the previous one. "manual": taking returns the
    # credit but the producer keeps the item until :meth:`Consumer.acknowledge` (a trainer acks
    # only what a checkpoint covers, so a crash re-delivers everything after it).
    ack: str = "take"
    # members the group has (e.g. the TP ranks of one replica); producers hold the group's
    # items back until that many members said hello, so no member misses an item. 0: unknown.
    group_size: int = 0
    # tcp links: ask the producer for this many parallel connections for large items' bytes
    # (lanes.py); 0: everything through zmq. Ignored on shm and CURVE links.
    lanes: int = 4
    lane_timeout_s: float = 60.0  # a lane item whose bytes do not arrive by then is dropped

    def __post_init__(self) -> None:
        if self.ack not in ("take", "manual"):
            raise ValueError(f"ack {self.ack!r}; expected 'take' or 'manual'")
        if self.prefetch < 1:
            raise ValueError(f"prefetch {self.prefetch}; expected >= 1")
        if self.heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s {self.heartbeat_s}; expected > 0")
        if not 0 <= self.lanes <= 64:
            raise ValueError(f"lanes {self.lanes}; expected 0 (off) to 64")


class _Seen:
    """Consumed sequence numbers of one producer: a contiguous watermark plus stragglers."""

    __slots__ = ("extra", "next")

    def __init__(self, start: int = 0) -> None:
        self.next = start
        self.extra: set[int] = set()

    def add(self, seq: int) -> bool:
        if seq < self.next or seq in self.extra:
            return False
        self.extra.add(seq)
        while self.next in self.extra:
            self.extra.remove(self.next)
            self.next += 1
        return True


@dataclass(slots=True)
class _LaneItem:
    """An item whose header came over zmq and whose bytes come over lanes."""

    header: bytes
    seq: int
    total: int
    lanes: LaneReceiver | UcxReceiver | None  # the link's bulk channel when the header came
    arrived: float = field(default_factory=time.monotonic)


class Consumer:
    """Iterate the items of pipe ``pipe`` that producers send to group ``group``."""

    def __init__(
        self,
        pipe: str,
        addresses: Sequence[str],
        *,
        group: str = "g0",
        member: str = "0",
        config: ConsumerConfig | None = None,
        resume: dict[str, int] | None = None,
        registry: RegistryClient | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("addresses is empty; expected at least one producer address")
        self.pipe = pipe
        self.group = group
        self.member = member
        self.config = config or ConsumerConfig()
        self.stats = PipeStats(pipe=pipe)
        self._registry = registry
        if registry is not None:
            registry.register(pipe=pipe, role="consumer", name=member, group=group)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        ident = f"{group}/{member}".encode()
        self._socks: list[zmq.Socket[bytes]] = []
        self._poller = zmq.Poller()
        self._shm = ShmReader()
        self.transports: list[str] = []
        self._use_shm: dict[zmq.Socket[bytes], bool] = {}
        self._lanes_wanted: dict[zmq.Socket[bytes], int] = {}
        self._bulk: dict[zmq.Socket[bytes], LaneReceiver | UcxReceiver] = {}
        self._ucx: set[zmq.Socket[bytes]] = set()  # links whose large items come over UCX
        # receive buffers kept for reuse per link: the credit window plus the item held
        self._pool_keep = self.config.prefetch + 2
        self._host_of: dict[zmq.Socket[bytes], str] = {}
        for address in addresses:
            target, use_shm = select_endpoint(address, self.config.transport)
            options = (
                client_options(self.config.curve_server_key)
                if self.config.curve_server_key
                else None
            )
            if target.startswith("ucx://") and self.config.transport != "ucx" and ucx_unavailable():
                target = "tcp://" + target.removeprefix("ucx://")  # no ucxx here: plain tcp
            sock = transport_for(target).connect(self._ctx, target, ident, options)
            self._socks.append(sock)
            self._use_shm[sock] = use_shm
            self.transports.append("shm" if use_shm else target.split("://", 1)[0])
            self._poller.register(sock, zmq.POLLIN)
            self._host_of[sock] = target.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
            if target.startswith("ucx://"):
                self._ucx.add(sock)
                self._bulk[sock] = UcxReceiver(self._host_of[sock], self._pool_keep)
            tcp = target.startswith("tcp://") and not use_shm and options is None
            self._lanes_wanted[sock] = self.config.lanes if tcp else 0
            self._control(sock, self._hello(sock, self.config.prefetch))
        self._seen: dict[str, _Seen] = {p: _Seen(n) for p, n in (resume or {}).items()}
        self._queue: deque[tuple[zmq.Socket[bytes], Item | _LaneItem]] = deque()
        self._taken: tuple[zmq.Socket[bytes], Item] | None = None
        self._sock_of: dict[str, zmq.Socket[bytes]] = {}  # producer name -> its link
        self._last_hb = time.monotonic()

    @classmethod
    def from_registry(
        cls,
        pipe: str,
        registry: RegistryClient,
        *,
        group: str = "g0",
        member: str = "0",
        config: ConsumerConfig | None = None,
        wait_s: float = 30.0,
    ) -> Consumer:
        """A consumer of every producer the registry lists for ``pipe`` (waits for one)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                addresses = registry.producer_addresses(pipe)
            except Exception as exc:  # NOT_FOUND until a producer created the pipe
                log.debug("pipe %s not available yet: %s", pipe, exc)
                addresses = []
            if addresses:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no producer registered pipe {pipe!r} within {wait_s} s")
            time.sleep(0.1)
        return cls(pipe, addresses, group=group, member=member, config=config, registry=registry)

    def position(self) -> dict[str, int]:
        """Per producer, the next sequence number not yet consumed (pass as ``resume``)."""
        return {p: s.next for p, s in self._seen.items()}

    def acknowledge(self, items: Iterable[Item]) -> None:
        """Acknowledge taken items (``ack="manual"``): their producers may now forget them."""
        acks: dict[str, list[int]] = {}
        for item in items:
            acks.setdefault(item.producer, []).append(item.seq)
        for producer, seqs in acks.items():
            sock = self._sock_of.get(producer)
            if sock is not None:
                self._control(sock, {"k": "ack", "acks": seqs})

    def __iter__(self) -> Iterator[Item]:
        return self

    def __next__(self) -> Item:
        item = self.get(timeout_s=self.config.timeout_s)
        if item is None:
            raise StopIteration
        return item

    def keep_alive(self) -> None:
        """Receive what arrived and heartbeat, without taking an item: a pipeline stage that is
        waiting on its own consumers calls this so its producers do not take it for dead (its
        lease) and re-spray what it holds."""
        self._receive(0)
        self._heartbeat()

    def get(self, timeout_s: float | None = None) -> Item | None:
        """The next item (acknowledging the previous one), or ``None`` after ``timeout_s``."""
        self._release()
        self._heartbeat()
        start = time.monotonic()
        deadline = None if timeout_s is None else start + timeout_s
        while True:
            while not self._queue:
                wait_ms = int(self.config.heartbeat_s * 1000)
                if deadline is not None:
                    wait_ms = max(0, min(wait_ms, int((deadline - time.monotonic()) * 1000)))
                self._receive(wait_ms)
                self._heartbeat()
                if not self._queue and deadline is not None and time.monotonic() >= deadline:
                    self.stats.wait_s += time.monotonic() - start
                    return None
            sock, entry = self._queue[0]
            if isinstance(entry, Item):
                item = entry
            else:
                got = self._take_lane_item(sock, entry, deadline)
                if got is None:
                    if deadline is not None and time.monotonic() >= deadline:
                        self.stats.wait_s += time.monotonic() - start
                        return None
                    continue
                item = got
            break
        self.stats.wait_s += time.monotonic() - start
        self._queue.popleft()
        self._taken = (sock, item)
        self.stats.items += 1
        self.stats.bytes += item.nbytes
        self.stats.queue_depth = len(self._queue)
        return item

    def close(self) -> None:
        """Acknowledge the last item, say goodbye and close the sockets."""
        try:
            self._release()
            for sock in self._socks:
                self._control(sock, {"k": "bye"})
        finally:
            for bulk in self._bulk.values():
                bulk.close()
            for sock in self._socks:
                sock.close(linger=100)
            self._ctx.term()
            self._shm.close()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- private
    def _control(self, sock: zmq.Socket[bytes], msg: dict[str, Any]) -> None:
        # never block on a link with no peer (producer gone, CURVE handshake refused): a lost
        # hello is repaired by the producer's "who" reply to our next heartbeat
        try:
            sock.send(msgpack.packb(msg, use_bin_type=True), zmq.NOBLOCK)
        except zmq.Again:
            log.debug("pipe %s: control message %s not sent (no peer)", self.pipe, msg.get("k"))

    def _release(self) -> None:
        if self._taken is None:
            return
        sock, item = self._taken
        self._taken = None
        acks = [item.seq] if self.config.ack == "take" else []
        self._control(sock, {"k": "credit", "n": 1, "acks": acks})

    def _hello(self, sock: zmq.Socket[bytes], credit: int) -> dict[str, Any]:
        hello = {
            "k": "hello",
            "group": self.group,
            "credit": credit,
            "shm": self._use_shm[sock],
            "size": self.config.group_size,
        }
        if self._lanes_wanted[sock]:
            hello["lanes"] = self._lanes_wanted[sock]
        bulk = self._bulk.get(sock)
        if isinstance(bulk, UcxReceiver):
            hello["ucx"] = bulk.address
        return hello

    def _open_lanes(self, sock: zmq.Socket[bytes], offer: dict[str, Any]) -> None:
        """The producer offered lanes: connect them (a failure leaves the link on zmq frames)."""
        old = self._bulk.pop(sock, None)
        if old is not None:
            old.close()
        try:
            port, token, n = int(offer["port"]), bytes(offer["token"]), int(offer["n"])
            self._bulk[sock] = LaneReceiver(
                self._host_of[sock], port, token, n, pool_keep=self._pool_keep
            )
        except (KeyError, TypeError, ValueError, OSError) as exc:
            log.warning("pipe %s: lanes offered but not connected (%s); using zmq", self.pipe, exc)

    def _take_lane_item(
        self, sock: zmq.Socket[bytes], entry: _LaneItem, deadline: float | None
    ) -> Item | None:
        """Wait (heartbeating) for a lane item's bytes; ``None``: not yet, or dropped."""
        lanes = entry.lanes
        give_up = entry.arrived + self.config.lane_timeout_s
        while True:
            step = self.config.heartbeat_s
            if deadline is not None:
                step = min(step, deadline - time.monotonic())
            flat = None
            if lanes is not None and step > 0:
                flat = lanes.wait(entry.seq, entry.total, step)
            self._heartbeat()
            if flat is not None:
                break
            broken = lanes is None or lanes.broken is not None
            if broken or time.monotonic() > give_up:
                # not marked seen: the producer still holds the item and sends it again after
                # a restart or to another group; this link's lanes are unusable
                self._queue.popleft()
                self.stats.malformed += 1
                why = "no bulk channel" if lanes is None else lanes.broken or "timed out"
                log.warning("pipe %s: lane item %d dropped (%s)", self.pipe, entry.seq, why)
                return None
            if deadline is not None and time.monotonic() >= deadline:
                return None
        try:
            item = decode_item([entry.header], flat=flat)
        except WireError as exc:
            self._queue.popleft()
            self.stats.malformed += 1
            log.warning("pipe %s: dropped malformed lane item: %s", self.pipe, exc)
            return None
        if not self._seen.setdefault(item.producer, _Seen()).add(item.seq):
            self._queue.popleft()  # a duplicate queued twice; ack it again
            self.stats.duplicates += 1
            self._control(sock, {"k": "credit", "n": 1, "acks": [item.seq]})
            return None
        return item

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_hb >= self.config.heartbeat_s:
            self._last_hb = now
            for sock in self._socks:
                self._control(sock, {"k": "credit", "n": 0})
        if self._registry is not None:
            self._registry.keep_alive()

    @staticmethod
    def _control_msg(frame: Any) -> dict[str, Any] | None:
        """A producer's control message (``who``, ``lanes``), else ``None``."""
        try:
            msg = msgpack.unpackb(bytes(frame.buffer), raw=False)
        except Exception:
            return None
        if isinstance(msg, dict) and msg.get("k") in ("who", "lanes"):
            return msg
        return None

    def _rehello(self, sock: zmq.Socket[bytes]) -> None:
        """The producer does not know us (it restarted): announce ourselves again."""
        held = sum(1 for s, _ in self._queue if s is sock)
        credit = max(self.config.prefetch - held, 0)
        if sock in self._ucx:  # a new producer process: a fresh listener for its endpoint
            old = self._bulk.pop(sock, None)
            if old is not None:
                old.close()
            self._bulk[sock] = UcxReceiver(self._host_of[sock], self._pool_keep)
        self._control(sock, self._hello(sock, credit))

    def _lane_header(self, sock: zmq.Socket[bytes], frame: Any) -> bool:
        """Queue an item whose bytes come over lanes; ``False`` if ``frame`` is not one."""
        try:
            header = decode_header(frame.buffer)
            total = flat_size(header)
            if total is None:
                return False
            producer, seq = str(header["prod"]), header["seq"]
            if not isinstance(seq, int):
                raise WireError(f"sequence number {seq!r}")
        except (WireError, KeyError) as exc:
            self.stats.malformed += 1
            log.warning("pipe %s: dropped malformed frame: %s", self.pipe, exc)
            return True
        lanes = self._bulk.get(sock)
        seen = self._seen.get(producer)
        try:
            if seen is not None and (seq < seen.next or seq in seen.extra):
                self.stats.duplicates += 1
                if lanes is not None:
                    lanes.discard(seq, total, header)
                self._control(sock, {"k": "credit", "n": 1, "acks": [seq]})
                return True
            if lanes is not None:
                lanes.expect(seq, total, header)
        except ValueError as exc:
            self.stats.malformed += 1
            log.warning("pipe %s: dropped malformed frame: %s", self.pipe, exc)
            return True
        self._sock_of[producer] = sock
        entry = _LaneItem(header=bytes(frame.buffer), seq=seq, total=total, lanes=lanes)
        self._queue.append((sock, entry))
        return True

    def _receive(self, wait_ms: int) -> None:
        events = dict(self._poller.poll(wait_ms))
        for sock in self._socks:
            if sock not in events:
                continue
            while sock.poll(0, zmq.POLLIN):
                frames = sock.recv_multipart(copy=False)
                msg = self._control_msg(frames[0]) if len(frames) == 1 else None
                if msg is not None and msg["k"] == "who":
                    self._rehello(sock)
                    continue
                if msg is not None:
                    self._open_lanes(sock, msg)
                    continue
                if len(frames) == 1 and self._lane_header(sock, frames[0]):
                    continue
                try:
                    item = decode_item(frames, shm=self._shm)
                except WireError as exc:
                    self.stats.malformed += 1
                    log.warning("pipe %s: dropped malformed frame: %s", self.pipe, exc)
                    continue
                self._sock_of[item.producer] = sock
                seen = self._seen.setdefault(item.producer, _Seen())
                if not seen.add(item.seq):
                    self.stats.duplicates += 1
                    self._control(sock, {"k": "credit", "n": 1, "acks": [item.seq]})
                    continue
                self._queue.append((sock, item))
