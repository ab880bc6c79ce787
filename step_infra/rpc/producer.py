"""The sending end of a pipe: credit-based spray or broadcast to consumer groups.

One ROUTER socket per producer; each consumer member connects a DEALER and announces itself
(``hello``: group, member, initial credit). A member returns one credit per item its trainer
takes and acknowledges it; heartbeats keep its lease. **spray** sends each item to the group
with the most credit (every member of that group gets the same frames); **broadcast** sends
each item to every group. The producer keeps every item until all members of its group(s)
acknowledged it and blocks in :meth:`Producer.send` while unacknowledged bytes exceed
``max_inflight_bytes`` (backpressure). A member whose lease expires is dropped; if its group
is left empty, that group's unacknowledged items are re-sprayed to the other groups.
Each member's items leave through its bulk channel (``bulk.py``; picked once, from its hello,
by ``bulk_producer.py``): shared memory, tcp lanes, UCX or plain zmq frames.
The zmq socket is used only on the caller's thread (zmq sockets are not thread-safe); the
bulk channels' own threads (tcp lanes) touch only their plain sockets. So there is no
background keep-alive: an idle producer must call :meth:`Producer.poll` (say every second),
or its registry lease lapses and consumers' credits and acks wait (their queued heartbeats
are read before their leases are judged, so consumers are not dropped for its idleness).
CUDA tensors are copied to host memory before sending on every transport, through reused
pinned staging buffers (``staging.py``: one stream synchronization per item, before any
transport reads the bytes); the item header marks them, and a consumer puts them on its own
CUDA device (``ConsumerConfig.device``). A staging buffer is reused only once nothing refers
to its bytes any more (the item acknowledged, zmq and the lanes done with them), and while
its item is in flight it counts in ``held_bytes`` as the item's bytes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import zmq

from step_infra.rpc import auth
from step_infra.rpc.bulk import BulkChannel, Outgoing
from step_infra.rpc.bulk_producer import ProducerBulk
from step_infra.rpc.guard import PeerGuard
from step_infra.rpc.messages import (
    MAX_CONTROL_BYTES,
    MAX_CREDIT,
    Ack,
    Bye,
    CreditMsg,
    Hello,
    Nack,
    Welcome,
    Who,
    decode_to_producer,
    encode,
)
from step_infra.rpc.security import CurveKeys, server_options
from step_infra.rpc.staging import StagingPool
from step_infra.rpc.stats import PipeStats
from step_infra.rpc.transport import Transport, make_transport, recv_bounded
from step_infra.rpc.wire import encode_item

if TYPE_CHECKING:
    from step_infra.rpc.registry import RegistryClient

log = logging.getLogger(__name__)

MODES = ("spray", "broadcast")
MAX_CHALLENGES = 4096  # outstanding job-token challenges remembered (oldest forgotten first)
MAX_ADMITTED = 1 << 20  # member nonces remembered per epoch against replayed hellos


@dataclass(frozen=True, slots=True, kw_only=True)
class ProducerConfig:
    """How a producer sends."""

    mode: str = "spray"
    transport: str = "tcp"
    shm: bool = True
    host: str = "127.0.0.1"
    port: int = 0
    # the job token members must prove they hold before they get credit or items (auth.py);
    # None: the registry client's token, else $STEP_TOKEN, else the pipe is open to any peer
    token: str | bytes | None = field(default=None, repr=False)
    curve: CurveKeys | None = None  # encrypt and authenticate data links (ZeroMQ CURVE)
    # what this producer holds for items not yet acknowledged by all their receivers (their
    # buffers or, once sent over shm, their shared-memory copies); send() blocks beyond it
    max_inflight_bytes: int = 512 << 20
    lease_s: float = 10.0
    send_timeout_s: float | None = None
    # tcp links: items of at least lane_min_bytes travel over up to ``lanes`` parallel plain
    # TCP connections per consumer member (see lanes.py); 0 lanes: every byte through zmq.
    # Links with CURVE never use lanes (they are not encrypted).
    lanes: int = 4
    lane_min_bytes: int = 1 << 20
    # a member's large items wait up to this long after its lanes were offered for them to
    # connect, rather than going out as zmq frames (several times slower for 64 MiB items)
    lane_wait_s: float = 2.0
    # items send() may leave queued for lack of consumer credit before it blocks: a stage that
    # must not stall while its consumers (re)start keeps working ahead, up to this many items
    # (and max_inflight_bytes); 0: send() returns once every item went to a consumer
    queue_items: int = 0
    # a peer whose messages were refused this many times (schema, MAC, proof) is dropped and
    # its messages ignored for ban_s seconds (guard.py)
    max_offences: int = 8
    ban_s: float = 60.0

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
        if self.max_offences < 1:
            raise ValueError(f"max_offences {self.max_offences}; expected >= 1")
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
    channel: BulkChannel  # how its items' bytes go (shm, lanes, ucx or zmq frames)
    group_size: int = 0  # members its group announced (0: unknown)
    session: auth.Session | None = None  # set when the member proved the job token


@dataclass(slots=True)
class _Pending(Outgoing):
    """An item not yet acknowledged by every member it went to."""

    waiting: dict[str, set[bytes]] = field(default_factory=dict)  # group -> members yet to ack


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
        # consumers only ever send small control messages: libzmq disconnects a peer that
        # sends a larger frame before any of it reaches Python
        options: dict[int, Any] = {zmq.MAXMSGSIZE: MAX_CONTROL_BYTES}
        if self.config.curve:
            options.update(server_options(self.config.curve))
        self._sock, self.address = tr.bind(self._ctx, self.config.host, self.config.port, options)
        self._bulk = ProducerBulk(pipe, self.config, tr, self._sock)
        if self._bulk.shm_endpoint is not None:
            self.address = f"{self.address};{self._bulk.shm_endpoint}"
        self._memory = self._bulk.memory
        self._seq = start_seq
        self._members: dict[bytes, _Member] = {}
        self._pending: dict[int, _Pending] = {}
        self._resend: deque[int] = deque()
        self._inflight = 0
        self._rr = 0
        self.stats = PipeStats(pipe=pipe)
        self._token = auth.resolve_token(
            self.config.token, registry.token if registry is not None else None
        )
        self._challenges: OrderedDict[bytes, bytes] = OrderedDict()  # ident -> nonce sent
        self._epoch = auth.nonce()  # published in the address: members prove the token on it
        self._admitted: OrderedDict[bytes, None] = OrderedDict()  # member nonces (no replays)
        if self._token is not None:
            self.address = auth.with_epoch(self.address, self._epoch)
        self._guard = PeerGuard(
            f"pipe {pipe} producer {name}",
            max_offences=self.config.max_offences,
            ban_s=self.config.ban_s,
        )
        if self._token is None:
            log.info("pipe %s: no job token; the data plane admits any peer", pipe)
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
    def held_bytes(self) -> int:
        """Memory this producer holds for its items: the buffers of items without a shared-
        memory copy, plus every segment it has mapped (in use or kept for reuse). ``send``
        keeps it within ``max_inflight_bytes`` (plus the one item being sent)."""
        return self._memory.held_bytes

    @property
    def staging(self) -> StagingPool:
        """The pinned host buffers CUDA tensors are copied through (``allocations`` counts
        the buffers made; unused on a producer that is never given CUDA tensors)."""
        return self._memory.staging

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
        # CUDA tensors' bytes into a reused pinned buffer (and waited for): the frames' views
        # hold it until the item is acknowledged and every transport let go of them
        staged = self._memory.staging.stage(tensors)
        frames = encode_item(
            pipe=self.pipe,
            producer=self.name,
            seq=seq,
            tensors=tensors,
            metadata=metadata,
            buffers=staged,
        )
        del staged
        nbytes = sum(memoryview(f).nbytes for f in frames)
        deadline = (
            None
            if self.config.send_timeout_s is None
            else time.monotonic() + self.config.send_timeout_s
        )
        while self.held_bytes > 0 and self.held_bytes + nbytes > self.config.max_inflight_bytes:
            if self._memory.trim():
                continue  # idle shared-memory segments were holding the room: let them go
            self._wait(deadline)
        pending = self._pending[seq] = _Pending(frames=frames, nbytes=nbytes)
        self._inflight += nbytes
        self._memory.hold(pending)
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
            m.channel.close()
        self._sock.close(linger=0)
        self._ctx.term()
        self._bulk.close()

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
            head = self._pending.get(self._resend[0])
            targets = self._targets(
                big=head is not None and head.nbytes >= self.config.lane_min_bytes
            )
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
            big = pending.nbytes >= self.config.lane_min_bytes
            for group, members in targets.items():
                pending.waiting[group] = set()
                for m in members:
                    if not m.channel.send(seq, pending, big=big, out=partial(self._send_item, m)):
                        unreachable.append(m)
                        continue
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

    def _send_item(self, member: _Member, frames: list[Any]) -> bool:
        """Hand an item's frames to one member; ``False``: it is unreachable (gone without a
        goodbye, e.g. kill -9, before its lease expired)."""
        try:
            self._sock.send_multipart([member.ident, *frames], copy=False)
        except zmq.ZMQError as exc:
            log.warning("pipe %s: member %r unreachable: %s", self.pipe, member.ident, exc)
            return False
        return True

    def _forget(self, seq: int) -> None:
        pending = self._pending.pop(seq)
        self._inflight -= pending.nbytes
        self._memory.forget(pending)

    def _targets(self, big: bool = False) -> dict[str, list[_Member]] | None:
        """Where the next item goes (``big``: members whose bulk channel is not ready yet, lanes
        still connecting within ``lane_wait_s``, have no credit for it)."""
        by_group: dict[str, list[_Member]] = {}
        for m in self._members.values():
            by_group.setdefault(m.group, []).append(m)
        # a group that announced more members than have joined waits: every member gets
        # every item of its group, so none may be sent before the last one is here
        by_group = {g: ms for g, ms in by_group.items() if len(ms) >= max(m.group_size for m in ms)}
        if not by_group:
            return None
        credit = {
            g: min(m.credit if not big or m.channel.ready() else 0 for m in ms)
            for g, ms in by_group.items()
        }
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
            frames, count = recv_bounded(self._sock, 3)
            ident = frames[0].bytes
            if self._guard.banned(ident):
                self.stats.refused += 1
                continue
            if count not in (2, 3):
                self._offend(ident, f"{count - 1} frames; expected a message (and a MAC)")
                continue
            mac = frames[2].bytes if len(frames) == 3 else None
            self._on_control(ident, frames[1].bytes, mac)
        self._expire()
        if self._registry is not None:
            self._registry.keep_alive()

    def _send_control(self, ident: bytes, msg: Any) -> None:
        with contextlib.suppress(zmq.ZMQError):  # the peer is gone: nothing to tell it
            self._sock.send_multipart([ident, encode(msg)])

    def _offend(self, ident: bytes, reason: str, *, auth_failure: bool = False) -> None:
        """Count a refused message of ``ident``; drop the peer when it keeps offending."""
        if auth_failure:
            self.stats.unauthenticated += 1
        else:
            self.stats.malformed += 1
        if self._guard.offend(ident, reason):
            self._challenges.pop(ident, None)
            self.stats.dropped_peers += 1
            self.stats.event("peer_dropped", ident, reason)
            member = self._members.get(ident)
            if member is not None:
                self._drop(member)

    def _on_control(self, ident: bytes, raw: bytes, mac: bytes | None) -> None:
        msg = decode_to_producer(raw)
        if isinstance(msg, str):
            self._offend(ident, msg)
            return
        member = self._members.get(ident)
        if isinstance(msg, Hello):
            self._on_hello(ident, msg, member)
            return
        if member is None:
            if ident in self._challenges:  # told to prove the token, did something else
                self._offend(
                    ident,
                    f"sent {type(msg).__name__} without proving the job token",
                    auth_failure=True,
                )
            else:
                self.stats.refused += 1  # not a member: its message is not acted on
            self._challenge(ident)  # unknown peer (we restarted, its lease expired): hello again
            return
        if member.session is not None:
            if not member.session.verify(raw, mac):
                self._offend(ident, "control message without its session's MAC", auth_failure=True)
                return
            if not member.session.accept_counter(msg.c):
                self._offend(
                    ident, f"replayed control message (counter {msg.c})", auth_failure=True
                )
                return
        member.last_seen = time.monotonic()
        if isinstance(msg, CreditMsg):
            member.credit = min(member.credit + msg.n, MAX_CREDIT)
        if isinstance(msg, (CreditMsg, Ack)):
            for seq in msg.acks:
                self._ack(seq, member)
        elif isinstance(msg, Nack):
            self._on_nack(member, msg)
        elif isinstance(msg, Bye):
            self._drop(member)

    def _challenge(self, ident: bytes) -> None:
        """Ask ``ident`` to say hello (answering a fresh nonce when the pipe has a token)."""
        if self._token is None:
            self._send_control(ident, Who())
            return
        nonce = self._challenges.get(ident)
        if nonce is None:
            nonce = self._challenges[ident] = auth.nonce()
            while len(self._challenges) > MAX_CHALLENGES:
                self._challenges.popitem(last=False)
        self._send_control(ident, Who(nonce=nonce))

    def _on_hello(self, ident: bytes, msg: Hello, member: _Member | None) -> None:
        session: auth.Session | None = None
        welcome = Welcome()
        if self._token is not None:
            session = self._authenticate(ident, msg, member)
            if session is None:
                return
            assert msg.pnonce is not None and msg.nonce is not None
            welcome = Welcome(
                proof=auth.welcome_proof(self._token, self.pipe, ident, msg.pnonce, msg.nonce)
            )
        if member is not None:
            member.channel.close()
        log.info("pipe %s: %r joined group %r", self.pipe, ident, msg.group)
        # the welcome goes before anything else (a lanes offer, any item): the member checks it
        self._send_control(ident, welcome)
        channel = self._bulk.channel_for(ident, msg, partial(self._send_control, ident))
        self._members[ident] = _Member(
            ident,
            msg.group,
            msg.credit,
            time.monotonic(),
            channel,
            group_size=msg.size,
            session=session,
        )

    def _authenticate(
        self, ident: bytes, msg: Hello, member: _Member | None
    ) -> auth.Session | None:
        """The session of a hello that proves the job token; ``None``: refused or challenged."""
        assert self._token is not None
        challenge = self._challenges.get(ident)
        if msg.proof is None or msg.nonce is None or msg.pnonce is None:
            if challenge is not None:  # a second hello that does not answer the challenge
                self._offend(ident, "hello without proof of the job token", auth_failure=True)
            self._challenge(ident)
            return None
        if msg.pnonce == self._epoch:
            if msg.nonce in self._admitted:
                self._offend(ident, "replayed hello", auth_failure=True)
                return None
        elif msg.pnonce != challenge:
            # answers a challenge we no longer hold, or another process's epoch (we restarted):
            # a repeat of an answered challenge is ignored, anything else challenged afresh
            if member is None or member.session is None:
                self._challenge(ident)
            return None
        expected = auth.hello_proof(self._token, self.pipe, ident, msg.pnonce, msg.nonce)
        if not auth.check(expected, msg.proof):
            self._offend(ident, "hello with a wrong proof of the job token", auth_failure=True)
            return None
        self._challenges.pop(ident, None)
        self._admitted[msg.nonce] = None
        while len(self._admitted) > MAX_ADMITTED:
            self._admitted.popitem(last=False)
        return auth.Session(self._token, self.pipe, ident, msg.pnonce, msg.nonce)

    def _on_nack(self, member: _Member, msg: Nack) -> None:
        """The member lost these items' bytes (its lanes broke): close its bulk channel, send
        the items again as zmq frames, to this member only, then renew the channel (fresh
        lanes if it asks)."""
        self.stats.event("nack", member.ident, msg.reason or "item bytes lost")
        member.channel.close()
        out = partial(self._send_item, member)
        for seq in msg.seqs:
            pending = self._pending.get(seq)
            if pending is None or member.ident not in pending.waiting.get(member.group, ()):
                continue  # acknowledged already, or never sent to this member
            if not member.channel.resend(pending, out):
                self._drop(member)
                return
            self.stats.resent += 1
        member.channel = member.channel.renew(msg.lanes)

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

    def _drop(self, member: _Member) -> None:
        member.channel.close()
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
