"""The sending end of a pipe: credit-based spray or broadcast to consumer groups.

One ROUTER socket per producer; each consumer member connects a DEALER and announces itself
(``hello``: group, member, initial credit). A member returns one credit per item its trainer
takes and acknowledges it; heartbeats keep its lease. **spray** sends each item to the group
with the most credit (every member of that group gets the same frames); **broadcast** sends
each item to every group. The producer keeps every item until all members of its group(s)
acknowledged it and blocks in :meth:`Producer.send` while unacknowledged bytes exceed
``max_inflight_bytes`` (backpressure). A member whose lease expires is dropped; if its group
is left empty, that group's unacknowledged items are re-sprayed to the other groups.
The zmq socket is used only on the caller's thread (zmq sockets are not thread-safe); the
bulk channels' own threads (tcp lanes) touch only their plain sockets. So there is no
background keep-alive: an idle producer must call :meth:`Producer.poll` (say every second),
or its registry lease lapses and consumers' credits and acks wait (their queued heartbeats
are read before their leases are judged, so consumers are not dropped for its idleness).
CUDA tensors are copied to host memory before sending on every transport.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import torch
import zmq

from step_infra.rpc.lanes import LaneListener, LaneSender
from step_infra.rpc.security import CurveKeys, server_options
from step_infra.rpc.shm import Segment, ShmPool, shm_address, shm_available
from step_infra.rpc.stats import PipeStats
from step_infra.rpc.transport import Transport, make_transport
from step_infra.rpc.ucx import UcxSender, UcxWorker
from step_infra.rpc.wire import encode_item, shm_bytes, to_flat_frames, to_shm_frames

if TYPE_CHECKING:
    from step_infra.rpc.registry import RegistryClient

log = logging.getLogger(__name__)

MODES = ("spray", "broadcast")


@dataclass(frozen=True, slots=True, kw_only=True)
class ProducerConfig:
    """How a producer sends."""

    mode: str = "spray"
    transport: str = "tcp"
    shm: bool = True
    host: str = "127.0.0.1"
    port: int = 0
    curve: CurveKeys | None = None  # encrypt and authenticate data links (ZeroMQ CURVE)
    max_inflight_bytes: int = 512 << 20
    lease_s: float = 10.0
    send_timeout_s: float | None = None
    # tcp links: items of at least lane_min_bytes travel over up to ``lanes`` parallel plain
    # TCP connections per consumer member (see lanes.py); 0 lanes: every byte through zmq.
    # Links with CURVE never use lanes (they are not encrypted).
    lanes: int = 4
    lane_min_bytes: int = 1 << 20
    # items send() may leave queued for lack of consumer credit before it blocks: a stage that
    # must not stall while its consumers (re)start keeps working ahead, up to this many items
    # (and max_inflight_bytes); 0: send() returns once every item went to a consumer
    queue_items: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}; expected one of {MODES}")
        if self.max_inflight_bytes <= 0:
            raise ValueError(f"max_inflight_bytes {self.max_inflight_bytes}; expected > 0")
        if self.lease_s <= 0:
            raise ValueError(f"lease_s {self.lease_s}; expected > 0")
        if self.queue_items < 0:
            raise ValueError(f"queue_items {self.queue_items}; expected >= 0")
        if not 0 <= self.lanes <= 64:
            raise ValueError(f"lanes {self.lanes}; expected 0 (off) to 64")
        if self.transport == "ucx" and self.curve is not None:
            raise ValueError(
                "curve keys with transport='ucx': CURVE encrypts zmq links only and UCX would "
                "carry the tensors in clear; use transport='tcp' for encrypted links"
            )


@dataclass(slots=True)
class _Member:
    ident: bytes
    group: str
    credit: int
    last_seen: float
    shm: bool = False
    group_size: int = 0  # members its group announced (0: unknown)
    lane_token: bytes | None = None  # lanes offered, not all connected yet
    bulk: LaneSender | UcxSender | None = None  # where large items' bytes go


@dataclass(slots=True)
class _Pending:
    frames: list[Any]
    nbytes: int
    waiting: dict[str, set[bytes]] = field(default_factory=dict)  # group -> members yet to ack
    shm_frames: list[bytes] | None = None
    segment: Segment | None = None
    flat: tuple[bytes, list[memoryview], list[int], int] | None = None  # for bulk channels


class Producer:
    """Send items (dicts of tensors plus metadata) into pipe ``pipe``."""

    def __init__(
        self,
        pipe: str,
        *,
        name: str = "producer-0",
        config: ProducerConfig | None = None,
        start_seq: int = 0,
        transport: Transport | None = None,
        registry: RegistryClient | None = None,
    ) -> None:
        self.pipe = pipe
        self.name = name
        self.config = config or ProducerConfig()
        tr = transport or make_transport(self.config.transport)  # fails early: ucx without ucxx
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sock, self.address = tr.bind(
            self._ctx,
            self.config.host,
            self.config.port,
            server_options(self.config.curve) if self.config.curve else None,
        )
        self._pool: ShmPool | None = None
        if self.config.shm and shm_available():
            # same-host consumers connect here and get payloads through shared memory
            ipc = f"ipc://{tempfile.gettempdir()}/steprpc-{uuid.uuid4().hex[:12]}.sock"
            self._sock.bind(ipc)
            self._ipc_path = ipc.removeprefix("ipc://")
            self.address = f"{self.address};{shm_address(ipc)}"
            self._pool = ShmPool()
        self._lanes: LaneListener | None = None
        if self.config.lanes and self.config.curve is None and tr.name in ("tcp", "ucx"):
            self._lanes = LaneListener(self.config.host)
        self._ucx: UcxWorker | None = UcxWorker() if tr.name == "ucx" else None
        self._seq = start_seq
        self._members: dict[bytes, _Member] = {}
        self._pending: dict[int, _Pending] = {}
        self._resend: deque[int] = deque()
        self._inflight = 0
        self._rr = 0
        self.stats = PipeStats(pipe=pipe)
        self._registry = registry
        if registry is not None:
            registry.create_pipe(pipe, self.config.mode)
            registry.register(pipe=pipe, role="producer", name=name, address=self.address)

    # ---------------------------------------------------------------- public
    @property
    def inflight_bytes(self) -> int:
        """Bytes sent but not yet acknowledged by every receiving member."""
        return self._inflight

    @property
    def unacked(self) -> int:
        """Number of items not yet acknowledged."""
        return len(self._pending)

    def groups(self) -> dict[str, list[str]]:
        """Current consumer groups and their members."""
        out: dict[str, list[str]] = {}
        for m in self._members.values():
            out.setdefault(m.group, []).append(m.ident.decode(errors="replace"))
        return out

    def wait_for_consumers(self, groups: int = 1, timeout_s: float = 10.0) -> None:
        """Block until at least ``groups`` consumer groups said hello."""
        deadline = time.monotonic() + timeout_s
        while len({m.group for m in self._members.values()}) < groups:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.groups())} of {groups} consumer groups joined")
            self._service(50)

    def send(
        self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
    ) -> int:
        """Send one item; blocks on backpressure (more than ``queue_items`` items waiting for
        consumer credit, or ``max_inflight_bytes`` unacknowledged). Returns its sequence number.
        Items left queued go out from later ``send`` and ``poll`` calls."""
        seq = self._seq
        self._seq += 1
        frames = encode_item(
            pipe=self.pipe, producer=self.name, seq=seq, tensors=tensors, metadata=metadata
        )
        nbytes = sum(memoryview(f).nbytes for f in frames)
        deadline = (
            None
            if self.config.send_timeout_s is None
            else time.monotonic() + self.config.send_timeout_s
        )
        while self._inflight > 0 and self._inflight + nbytes > self.config.max_inflight_bytes:
            self._wait(deadline)
        self._pending[seq] = _Pending(frames=frames, nbytes=nbytes)
        self._inflight += nbytes
        self._resend.append(seq)
        self._pump(deadline, keep=self.config.queue_items)
        return seq

    def flush(self, timeout_s: float = 30.0) -> None:
        """Block until every sent item is acknowledged."""
        deadline = time.monotonic() + timeout_s
        while self._pending:
            self._pump(deadline)
            if self._pending:
                self._wait(deadline)

    def poll(self, timeout_ms: int = 0) -> None:
        """Process acks, credits and heartbeats; call while idle to keep leases fresh."""
        self._service(timeout_ms)
        self._pump(time.monotonic())

    def close(self) -> None:
        """Close the socket (unacknowledged items are lost with this process)."""
        for m in self._members.values():
            self._release_lanes(m)
        if self._lanes is not None:
            self._lanes.close()
        if self._ucx is not None:
            self._ucx.close()
        self._sock.close(linger=0)
        self._ctx.term()
        if self._pool is not None:
            self._pool.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._ipc_path)

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- private
    def _wait(self, deadline: float | None) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(
                f"pipe {self.pipe!r}: no consumer credit or acks before the send timeout "
                f"({self._inflight} bytes in flight, {len(self._resend)} queued)"
            )
        self._service(20)

    @property
    def queued(self) -> int:
        """Items waiting for consumer credit (not yet sent to anyone)."""
        return len(self._resend)

    def _pump(self, deadline: float | None, *, keep: int = 0) -> None:
        """Send queued items while some target has credit; without credit, wait until at most
        ``keep`` items are left queued (or ``deadline`` passes)."""
        while self._resend:
            self._service(0)
            targets = self._targets()
            if targets is None:
                if len(self._resend) <= keep:
                    return
                if deadline is not None and time.monotonic() > deadline:
                    return
                self._wait(deadline)
                continue
            seq = self._resend.popleft()
            pending = self._pending.get(seq)
            if pending is None:
                continue
            unreachable: list[_Member] = []
            for group, members in targets.items():
                pending.waiting[group] = set()
                for m in members:
                    big = pending.nbytes >= self.config.lane_min_bytes
                    bulk = self._bulk_of(m) if big and not m.shm else None
                    if m.shm:
                        frames = self._shm_frames(pending)
                    elif bulk is not None:
                        frames = [self._flat(pending)[0]]
                    else:
                        frames = pending.frames
                    try:
                        self._sock.send_multipart([m.ident, *frames], copy=False)
                    except zmq.ZMQError as exc:
                        log.warning("pipe %s: member %r unreachable: %s", self.pipe, m.ident, exc)
                        unreachable.append(m)
                        continue
                    if bulk is not None:
                        _, buffers, offsets, total = self._flat(pending)
                        bulk.send(seq, buffers, offsets, total)
                    m.credit -= 1
                    pending.waiting[group].add(m.ident)
            if unreachable:
                # A group none of whose members got the item has not received it: undo, and
                # queue the item again (before dropping the dead members, whose drop would
                # otherwise take the empty wait list for an acknowledgement).
                for g in [g for g, w in pending.waiting.items() if not w]:
                    del pending.waiting[g]
                for m in unreachable:
                    self._drop(m)
                if not pending.waiting:
                    self._resend.appendleft(seq)
                    continue
            self.stats.items += 1
            self.stats.bytes += pending.nbytes
            self.stats.queue_depth = len(self._resend)

    def _shm_frames(self, pending: _Pending) -> list[Any]:
        if pending.shm_frames is None:
            assert self._pool is not None, "a member announced shm on a producer without shm"
            pending.segment = self._pool.acquire(shm_bytes(pending.frames))
            pending.shm_frames = to_shm_frames(pending.frames, pending.segment)
        return pending.shm_frames

    def _flat(self, pending: _Pending) -> tuple[bytes, list[memoryview], list[int], int]:
        if pending.flat is None:
            pending.flat = to_flat_frames(pending.frames)
        return pending.flat

    def _bulk_of(self, member: _Member) -> LaneSender | UcxSender | None:
        """The member's bulk channel (ucx, or lanes once all connected); ``None``: zmq frames."""
        if member.bulk is None and member.lane_token is not None and self._lanes is not None:
            socks = self._lanes.take(member.lane_token)
            if socks is not None:
                member.bulk = LaneSender(socks)
                member.lane_token = None
        if member.bulk is not None and member.bulk.broken:
            return None
        return member.bulk

    def _forget(self, seq: int) -> None:
        pending = self._pending.pop(seq)
        self._inflight -= pending.nbytes
        if pending.segment is not None and self._pool is not None:
            self._pool.release(pending.segment)

    def _targets(self) -> dict[str, list[_Member]] | None:
        by_group: dict[str, list[_Member]] = {}
        for m in self._members.values():
            by_group.setdefault(m.group, []).append(m)
        # a group that announced more members than have joined waits: every member gets
        # every item of its group, so none may be sent before the last one is here
        by_group = {g: ms for g, ms in by_group.items() if len(ms) >= max(m.group_size for m in ms)}
        if not by_group:
            return None
        credit = {g: min(m.credit for m in ms) for g, ms in by_group.items()}
        if self.config.mode == "broadcast":
            return by_group if all(c > 0 for c in credit.values()) else None
        best = max(credit.values())
        if best <= 0:
            return None
        names = sorted(g for g, c in credit.items() if c == best)
        self._rr += 1
        group = names[self._rr % len(names)]
        return {group: by_group[group]}

    def _service(self, timeout_ms: int) -> None:
        """Read control messages from consumers and expire leases."""
        wait = timeout_ms
        while self._sock.poll(wait, zmq.POLLIN):
            wait = 0
            frames = self._sock.recv_multipart()
            if len(frames) != 2:
                self.stats.malformed += 1
                continue
            self._on_control(frames[0], frames[1])
        self._expire()
        if self._registry is not None:
            self._registry.keep_alive()

    def _on_control(self, ident: bytes, raw: bytes) -> None:
        try:
            msg = msgpack.unpackb(raw, raw=False)
            kind = msg["k"]
        except Exception:  # garbage from a peer: count and drop, keep the link
            self.stats.malformed += 1
            log.warning("pipe %s: malformed control frame from %r", self.pipe, ident)
            return
        now = time.monotonic()
        member = self._members.get(ident)
        if kind == "hello":
            group = str(msg.get("group", ""))
            shm = bool(msg.get("shm", False)) and self._pool is not None
            if member is not None:
                self._release_lanes(member)
            member = _Member(
                ident,
                group,
                int(msg.get("credit", 1)),
                now,
                shm,
                group_size=int(msg.get("size", 0) or 0),
            )
            self._members[ident] = member
            log.info("pipe %s: %r joined group %r", self.pipe, ident, group)
            want = int(msg.get("lanes", 0) or 0)
            ucx = msg.get("ucx")
            if self._ucx is not None and not shm and isinstance(ucx, str):
                try:
                    member.bulk = UcxSender(self._ucx, ucx)
                except Exception as exc:  # ucxx raises its own error types
                    log.warning("pipe %s: no ucx endpoint to %r (%s)", self.pipe, ident, exc)
            elif self._lanes is not None and not shm and want > 0:
                lanes = min(want, self.config.lanes)
                member.lane_token = self._lanes.expect(lanes)
                offer = {"v": 1, "k": "lanes", "port": self._lanes.port, "n": lanes}
                offer["token"] = member.lane_token
                with contextlib.suppress(zmq.ZMQError):
                    self._sock.send_multipart([ident, msgpack.packb(offer, use_bin_type=True)])
            return
        if member is None:
            # unknown peer (we restarted, or its lease expired): ask it to say hello again
            with contextlib.suppress(zmq.ZMQError):
                self._sock.send_multipart([ident, msgpack.packb({"v": 1, "k": "who"})])
            return
        member.last_seen = now
        if kind == "credit":
            member.credit += int(msg.get("n", 1))
        if kind in ("credit", "ack"):
            for seq in msg.get("acks", ()):
                self._ack(int(seq), member)
        if kind == "bye":
            self._drop(member)

    def _ack(self, seq: int, member: _Member) -> None:
        pending = self._pending.get(seq)
        if pending is None:
            return
        waiting = pending.waiting.get(member.group)
        if waiting is None:
            return
        waiting.discard(member.ident)
        if not waiting:
            del pending.waiting[member.group]
            if not pending.waiting:
                self._forget(seq)

    def _expire(self) -> None:
        now = time.monotonic()
        for m in [m for m in self._members.values() if now - m.last_seen > self.config.lease_s]:
            log.warning("pipe %s: lease of %r expired", self.pipe, m.ident)
            self._drop(m)

    def _release_lanes(self, member: _Member) -> None:
        if member.bulk is not None:
            member.bulk.close()
            member.bulk = None
        if member.lane_token is not None and self._lanes is not None:
            self._lanes.forget(member.lane_token)
            member.lane_token = None

    def _drop(self, member: _Member) -> None:
        self._release_lanes(member)
        self._members.pop(member.ident, None)
        group_alive = any(m.group == member.group for m in self._members.values())
        resend: list[int] = []
        for seq, pending in sorted(self._pending.items()):
            waiting = pending.waiting.get(member.group)
            if waiting is None:
                continue
            waiting.discard(member.ident)
            if group_alive and waiting:
                continue
            del pending.waiting[member.group]
            if not group_alive and self.config.mode == "spray":
                resend.append(seq)  # the group is gone: another group gets the item
                self.stats.resent += 1
            elif not pending.waiting:
                self._forget(seq)
        self._resend.extendleft(reversed(resend))  # oldest first, ahead of new items
