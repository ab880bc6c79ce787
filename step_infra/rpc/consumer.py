"""The receiving end of a pipe: an iterator of items, exactly once to the training loop.

A consumer is one member of one group. It connects a DEALER to each producer address, says
hello with ``prefetch`` credits, and hands items to the caller in arrival order (so one
producer's items arrive in order). Taking the next item returns the previous one's credit and,
by default, acknowledges it: the producer only forgets an item once the trainer moved past it
(``ack="manual"`` defers the acknowledgement to :meth:`Consumer.acknowledge`, e.g. until a
checkpoint covers the item).
Duplicates (by ``(producer, seq)``) are dropped; :meth:`Consumer.position` reports what was
consumed so a restarted job resumes where it stopped. Memory is bounded by ``prefetch``
items per producer link.

Nothing a producer sends is trusted: every message is checked against its schema
(``messages.py``) and every size against ``max_item_bytes`` and the shapes it announces before
anything is allocated; a refused message is counted and dropped, and a link that keeps sending
them is closed (``guard.py``). Under a job token a link delivers nothing until its producer
proved the token (``auth.py``). A large item's bytes may come beside its header, over the
link's bulk channel (``bulk.py``; picked once per link by ``bulk_consumer.py``: tcp lanes, UCX,
or shared memory on the same host). A large item whose bytes a broken channel lost keeps its
place in the queue and is asked for again (``nack``): it arrives over zmq frames, still in
order.

Tensors that were CUDA tensors on their producer (the header's ``devs``) are put on this
process's current CUDA device by default (``ConsumerConfig.device``, rule in
:func:`target_device`): copied host-to-device with ``non_blocking=True`` from the received
buffer (lane buffers are pinned then; zmq frames and shm segments are pageable, and the CUDA
driver stages those itself), and the streams synchronized before :meth:`Consumer.get` returns,
so the receive buffer is never released or reused (the shm segment after the next take's
acknowledgement, a lane buffer once no tensor refers to it) under a copy still running.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import msgspec
import torch
import zmq

from step_infra.rpc import auth
from step_infra.rpc.bulk import BulkReceiver, LinkChannel
from step_infra.rpc.bulk_consumer import link_channel
from step_infra.rpc.guard import PeerGuard
from step_infra.rpc.messages import (
    MAX_ACKS,
    MAX_CONTROL_BYTES,
    MAX_TENSORS,
    Ack,
    Bye,
    CreditMsg,
    Hello,
    ItemHeader,
    LanesOffer,
    Nack,
    Welcome,
    Who,
    decode_to_consumer,
    encode,
)
from step_infra.rpc.security import client_options
from step_infra.rpc.shm import ShmReader, select_endpoint
from step_infra.rpc.stats import PipeStats
from step_infra.rpc.transport import recv_bounded, transport_for
from step_infra.rpc.ucx import ucx_unavailable
from step_infra.rpc.wire import Item, WireError, check_flat, decode_item

if TYPE_CHECKING:
    from step_infra.rpc.registry import RegistryClient

log = logging.getLogger(__name__)

DEVICE_MODES = ("auto", "cpu")  # besides an explicit "cuda" / "cuda:<index>"


def _explicit_cuda(device: str) -> torch.device | None:
    """``device`` as an explicit CUDA device (``None``: "auto" or "cpu"); raises ``ValueError``
    for anything else."""
    if device in DEVICE_MODES:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(
            f"device {device!r} is not a device; expected 'auto', 'cpu', 'cuda' or 'cuda:<index>'"
        ) from exc
    if dev.type != "cuda":
        raise ValueError(
            f"device {device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:<index>' (tensors of "
            "other devices arrive on the CPU)"
        )
    return dev


def _cuda_usable() -> bool:
    """Whether this process can put tensors on a CUDA device."""
    bad_fork = getattr(torch.cuda, "_is_in_bad_fork", lambda: False)
    return bool(torch.cuda.is_available()) and not bad_fork()


def target_device(
    marked: str, config_device: str, cuda_available: bool, *, current_index: int = 0
) -> torch.device:
    """Where a received tensor goes: ``marked`` is where it was on its producer (``"cpu"`` or
    ``"cuda"``, the header's ``devs``), ``config_device`` is ``ConsumerConfig.device``.

    * ``"cpu"``: the CPU, always;
    * ``"auto"``: a ``"cuda"`` tensor goes to the current CUDA device (``current_index``) when
      CUDA is available, else stays on the CPU (the consumer warns once); CPU tensors stay;
    * ``"cuda"`` or ``"cuda:<n>"``: every tensor goes there, marked or not (``"cuda"``: the
      current device); raises ``ValueError`` when CUDA is not available.
    """
    explicit = _explicit_cuda(config_device)
    if explicit is not None:
        if not cuda_available:
            raise ValueError(
                f"ConsumerConfig.device {config_device!r} but CUDA is not available here; use "
                "device='auto' (CUDA tensors stay on the CPU) or 'cpu'"
            )
        index = explicit.index if explicit.index is not None else current_index
        return torch.device("cuda", index)
    if config_device == "auto" and marked == "cuda" and cuda_available:
        return torch.device("cuda", current_index)
    return torch.device("cpu")


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsumerConfig:
    """How a consumer receives."""

    prefetch: int = 4
    transport: str | None = None  # None: shm when the producer is on this host, else tcp
    # the job token producers must prove they hold (auth.py); None: the registry client's
    # token, else $STEP_TOKEN, else links are open (the producer must be open too)
    token: str | bytes | None = field(default=None, repr=False)
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
    lane_timeout_s: float = 60.0  # a lane item's bytes not there by then are asked for again
    # the largest item accepted: an item (or lane stripe) announcing more is refused before
    # anything is allocated
    max_item_bytes: int = 16 << 30
    # a producer link whose messages were refused this many times is closed (guard.py)
    max_offences: int = 8
    # where tensors go (target_device): "auto" puts tensors its producer sent from a CUDA
    # device on this process's current CUDA device (on the CPU, with a warning, without CUDA);
    # "cpu" keeps everything on the CPU; "cuda"/"cuda:<n>" puts every tensor on that device
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.ack not in ("take", "manual"):
            raise ValueError(f"ack {self.ack!r}; expected 'take' or 'manual'")
        if self.prefetch < 1:
            raise ValueError(f"prefetch {self.prefetch}; expected >= 1")
        if self.heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s {self.heartbeat_s}; expected > 0")
        if not 0 <= self.lanes <= 64:
            raise ValueError(f"lanes {self.lanes}; expected 0 (off) to 64")
        if self.max_item_bytes <= 0:
            raise ValueError(f"max_item_bytes {self.max_item_bytes}; expected > 0")
        if self.max_offences < 1:
            raise ValueError(f"max_offences {self.max_offences}; expected >= 1")
        _explicit_cuda(self.device)  # raises for a device string it cannot use


class _Seen:
    """Consumed sequence numbers of one producer: a contiguous watermark plus stragglers."""

    __slots__ = ("extra", "next")

    def __init__(self, start: int = 0) -> None:
        self.next = start
        self.extra: set[int] = set()

    def __contains__(self, seq: int) -> bool:
        return seq < self.next or seq in self.extra

    def add(self, seq: int) -> bool:
        if seq in self:
            return False
        self.extra.add(seq)
        while self.next in self.extra:
            self.extra.remove(self.next)
            self.next += 1
        return True


@dataclass(slots=True, eq=False)
class _Link:
    """One producer link: its socket, bulk channel and authentication state."""

    sock: zmq.Socket[bytes]
    address: str
    channel: LinkChannel  # where large items' bytes arrive (shm, lanes, ucx or zmq frames)
    producer_nonce: bytes | None = None  # the challenge answered last
    nonce: bytes | None = None  # our half of that handshake
    session: auth.Session | None = None
    admitted: bool = False  # the producer welcomed us (and proved the token, if we have one)
    dropped: str | None = None  # why the link was closed
    told: set[str] = field(default_factory=set)  # problems already logged once

    def once(self, what: str) -> bool:
        """``True`` the first time ``what`` happens on this link."""
        if what in self.told:
            return False
        self.told.add(what)
        return True


@dataclass(slots=True)
class _LaneItem:
    """An item whose header came over zmq and whose bytes come over a bulk channel (or, after
    a nack, again as zmq frames: ``resent``)."""

    header: ItemHeader
    total: int
    lanes: BulkReceiver | None  # the link's bulk receiver when the header came
    arrived: float = field(default_factory=time.monotonic)
    nacked: bool = False
    resent: Item | None = None

    @property
    def seq(self) -> int:
        return self.header.seq


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
        self._token = auth.resolve_token(
            self.config.token, registry.token if registry is not None else None
        )
        self._guard = PeerGuard(
            f"pipe {pipe} consumer {group}/{member}", max_offences=self.config.max_offences
        )
        self._registry = registry
        if registry is not None:
            registry.register(pipe=pipe, role="consumer", name=member, group=group)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        # CUDA is asked about only when tensors may go there (a "cpu" consumer never does);
        # a process forked after its parent started CUDA (a DataLoader worker) cannot use it
        self._cuda = self.config.device != "cpu" and _cuda_usable()
        explicit = _explicit_cuda(self.config.device)
        if explicit is not None:
            target_device("cpu", self.config.device, self._cuda)  # raises without CUDA
            if explicit.index is not None and explicit.index >= torch.cuda.device_count():
                raise ValueError(
                    f"ConsumerConfig.device {self.config.device!r}: this process sees "
                    f"{torch.cuda.device_count()} CUDA devices"
                )
        self._warned_no_cuda = False
        self._ident = f"{group}/{member}".encode()
        self._links: list[_Link] = []
        self._link_of: dict[zmq.Socket[bytes], _Link] = {}
        self._poller = zmq.Poller()
        self._shm = ShmReader()
        self.transports: list[str] = []
        # receive buffers kept for reuse per link: the credit window plus the item held
        self._pool_keep = self.config.prefetch + 2
        # items one link may have queued: its credit window, twice over for the items a
        # re-hello's fresh credit lets through while the old window is still on the way
        self._max_queued = 2 * self.config.prefetch + 2
        for address in addresses:
            self._connect(address)
        self._seen: dict[str, _Seen] = {p: _Seen(n) for p, n in (resume or {}).items()}
        self._queue: deque[tuple[_Link, Item | _LaneItem]] = deque()
        self._awaiting: dict[tuple[int, str, int], _LaneItem] = {}  # nacked, by link/prod/seq
        self._taken: tuple[_Link, Item] | None = None
        self._link_of_producer: dict[str, _Link] = {}
        self._last_hb = time.monotonic()

    def _connect(self, address: str) -> None:
        target, use_shm = select_endpoint(address, self.config.transport)
        # a frame larger than any item could be is refused by libzmq before it is buffered
        options: dict[int, Any] = {
            zmq.MAXMSGSIZE: max(self.config.max_item_bytes, MAX_CONTROL_BYTES)
        }
        if self.config.curve_server_key:
            options.update(client_options(self.config.curve_server_key))
        if target.startswith("ucx://") and self.config.transport != "ucx" and ucx_unavailable():
            target = "tcp://" + target.removeprefix("ucx://")  # no ucxx here: plain tcp
        transport = transport_for(target)
        sock = transport.connect(self._ctx, target, self._ident, options)
        channel = link_channel(
            transport,
            target,
            pipe=self.pipe,
            shm=use_shm,
            encrypted=bool(self.config.curve_server_key),
            lanes=self.config.lanes,
            pool_keep=self._pool_keep,
            max_item_bytes=self.config.max_item_bytes,
            max_items=self._max_queued,
            pin=self._cuda,  # lane buffers page-locked: host-to-device copies without a bounce
        )
        link = _Link(sock=sock, address=target, channel=channel)
        epoch = auth.address_epoch(address)
        self._links.append(link)
        self._link_of[sock] = link
        self.transports.append("shm" if use_shm else target.split("://", 1)[0])
        self._poller.register(sock, zmq.POLLIN)
        # under a token, the first hello proves it on the epoch the producer published
        self._control(link, self._hello(link, self.config.prefetch, epoch))

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
            link = self._link_of_producer.get(producer)
            if link is not None:
                for i in range(0, len(seqs), MAX_ACKS):
                    self._control(link, Ack(acks=seqs[i : i + MAX_ACKS]))

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
        """The next item (acknowledging the previous one), or ``None`` after ``timeout_s``.

        Raises ``ConnectionError`` only when ``timeout_s`` is ``None`` and every producer link
        was closed for misbehaving (waiting would be for ever)."""
        self._release()
        self._heartbeat()
        start = time.monotonic()
        deadline = None if timeout_s is None else start + timeout_s
        while True:
            while not self._queue:
                if deadline is None and all(link.dropped for link in self._links):
                    reasons = "; ".join(f"{lk.address}: {lk.dropped}" for lk in self._links)
                    raise ConnectionError(
                        f"pipe {self.pipe!r}: every producer link was closed ({reasons})"
                    )
                wait_ms = int(self.config.heartbeat_s * 1000)
                if deadline is not None:
                    wait_ms = max(0, min(wait_ms, int((deadline - time.monotonic()) * 1000)))
                self._receive(wait_ms)
                self._heartbeat()
                if not self._queue and deadline is not None and time.monotonic() >= deadline:
                    self.stats.wait_s += time.monotonic() - start
                    return None
            link, entry = self._queue[0]
            if isinstance(entry, Item):
                item = entry
            else:
                got = self._take_lane_item(link, entry, deadline)
                if got is None:
                    if deadline is not None and time.monotonic() >= deadline:
                        self.stats.wait_s += time.monotonic() - start
                        return None
                    continue
                item = got
            break
        self.stats.wait_s += time.monotonic() - start
        self._queue.popleft()
        item = self._place(item)
        self._taken = (link, item)
        self.stats.items += 1
        self.stats.bytes += item.nbytes
        self.stats.queue_depth = len(self._queue)
        return item

    def _place(self, item: Item) -> Item:
        """``item`` with its tensors on the devices :func:`target_device` names; the copies
        finished (so its receive buffers may be reused as soon as it is acknowledged)."""
        device = self.config.device
        if device == "cpu" or (device == "auto" and "cuda" not in item.devices.values()):
            return item  # nothing to move: CPU items cost one dict lookup
        if not self._cuda:  # "auto" without CUDA (an explicit device was refused at start)
            if not self._warned_no_cuda:
                self._warned_no_cuda = True
                log.warning(
                    "pipe %s: producer %s sends CUDA tensors and CUDA is not available here; "
                    "they arrive on the CPU (ConsumerConfig.device='cpu' says so quietly)",
                    self.pipe,
                    item.producer,
                )
            return item
        current = torch.cuda.current_device()
        moved: dict[str, torch.Tensor] = {}
        used: set[torch.device] = set()
        for name, t in item.tensors.items():
            dev = target_device(item.devices.get(name, "cpu"), device, True, current_index=current)
            if dev.type == "cpu":
                moved[name] = t
                continue
            moved[name] = t.to(dev, non_blocking=True)  # from the receive buffer, no host copy
            used.add(dev)
        for dev in used:
            # once per item: the receive buffer (shm segment, lane buffer, zmq frame) may be
            # reused once this item is acknowledged, so no copy may still read it by then
            torch.cuda.current_stream(dev).synchronize()
        return replace(item, tensors=moved)

    def close(self) -> None:
        """Acknowledge the last item, say goodbye and close the sockets."""
        try:
            self._release()
            for link in self._links:
                self._control(link, Bye())
        finally:
            for link in self._links:
                link.channel.close()
                link.sock.close(linger=100)
            self._ctx.term()
            self._shm.close()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ sending to producers
    def _control(self, link: _Link, msg: Any) -> None:
        """Send one control message; under a session it carries a counter and a MAC frame.
        Never blocks on a link with no peer (producer gone, CURVE handshake refused): a lost
        hello is repaired by the producer's ``who`` reply to our next heartbeat."""
        if link.dropped:
            return
        if link.session is not None and not isinstance(msg, Hello):
            msg = msgspec.structs.replace(msg, c=link.session.next_counter())
            raw = encode(msg)
            frames = [raw, link.session.mac(raw)]
        else:
            frames = [encode(msg)]
        try:
            link.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # Again: no peer yet; or the socket is already closed
            log.debug("pipe %s: %s not sent (%s)", self.pipe, type(msg).__name__, exc)

    def _release(self) -> None:
        if self._taken is None:
            return
        link, item = self._taken
        self._taken = None
        acks = [item.seq] if self.config.ack == "take" else []
        self._control(link, CreditMsg(n=1, acks=acks))

    def _hello(self, link: _Link, credit: int, producer_nonce: bytes | None) -> Hello:
        """A hello; with a token and the producer's nonce (its epoch or a challenge) it proves
        the token and starts a new session."""
        pnonce = nonce = proof = None
        if self._token is not None and producer_nonce is not None:
            link.producer_nonce, link.nonce = producer_nonce, auth.nonce()
            pnonce, nonce = producer_nonce, link.nonce
            proof = auth.hello_proof(self._token, self.pipe, self._ident, pnonce, nonce)
        ask = link.channel.ask()
        return Hello(
            group=self.group,
            credit=credit,
            shm=ask.shm,
            size=self.config.group_size,
            lanes=ask.lanes,
            ucx=ask.ucx,
            pnonce=pnonce,
            nonce=nonce,
            proof=proof,
        )

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_hb >= self.config.heartbeat_s:
            self._last_hb = now
            for link in self._links:
                self._control(link, CreditMsg(n=0))
        if self._registry is not None:
            self._registry.keep_alive()

    # ------------------------------------------------------------ receiving from producers
    def _offend(self, link: _Link, reason: str, *, auth_failure: bool = False) -> None:
        """Count a refused message of ``link``'s producer; close the link when it keeps on."""
        if auth_failure:
            self.stats.unauthenticated += 1
        else:
            self.stats.malformed += 1
        if self._guard.offend(link.address, reason):
            self._drop_link(link, f"closed after repeated refused messages (last: {reason})")

    def _drop_link(self, link: _Link, reason: str) -> None:
        link.dropped = reason
        self.stats.dropped_peers += 1
        self.stats.event("peer_dropped", link.address, reason)
        self._poller.unregister(link.sock)
        link.channel.close()
        # what it queued and could not finish is lost with it (its producer still holds it)
        self._queue = deque(
            (lk, e) for lk, e in self._queue if lk is not link or isinstance(e, Item)
        )

    def _receive(self, wait_ms: int) -> None:
        events = dict(self._poller.poll(wait_ms))
        for link in self._links:
            if link.sock not in events:
                continue
            while not link.dropped and link.sock.poll(0, zmq.POLLIN):
                frames, count = recv_bounded(link.sock, 1 + MAX_TENSORS)
                if count > 1 + MAX_TENSORS:
                    self._offend(link, f"{count} frames; at most {1 + MAX_TENSORS} expected")
                    continue
                msg = decode_to_consumer(frames[0].buffer)
                if isinstance(msg, str):
                    self._offend(link, msg)
                    continue
                if isinstance(msg, Who):
                    self._rehello(link, msg)
                elif isinstance(msg, Welcome):
                    self._on_welcome(link, msg)
                elif not link.admitted and self._token is not None:
                    self.stats.unauthenticated += 1
                    if link.once("unproven"):
                        log.warning(
                            "pipe %s: %s sent %s before proving the job token; ignored",
                            self.pipe,
                            link.address,
                            type(msg).__name__,
                        )
                elif isinstance(msg, LanesOffer):
                    self._open_lanes(link, msg)
                elif len(frames) > 1 + len(msg.names):
                    self._offend(link, f"{count - 1} buffer frames for {len(msg.names)} tensors")
                else:
                    self._on_item(link, msg, frames)

    def _rehello(self, link: _Link, who: Who) -> None:
        """The producer does not know us (it restarted) or challenges us: say hello again."""
        if who.nonce is not None and who.nonce == link.producer_nonce:
            return  # this challenge was answered already (a repeat sent before our answer came)
        if who.nonce is not None and self._token is None:
            if link.once("needs token"):
                log.error(
                    "pipe %s: producer %s requires the job token and this consumer has none "
                    "(set ConsumerConfig.token, $STEP_TOKEN, or pass the job's registry)",
                    self.pipe,
                    link.address,
                )
            return
        link.admitted = False
        link.session = None
        held = sum(1 for lk, _ in self._queue if lk is link)
        credit = max(self.config.prefetch - held, 0)
        link.channel.restart()  # e.g. a fresh UCX listener for a new producer process
        self._control(link, self._hello(link, credit, who.nonce))

    def _on_welcome(self, link: _Link, msg: Welcome) -> None:
        if self._token is None:
            link.admitted = True
            return
        ok = link.producer_nonce is not None and link.nonce is not None
        if ok:
            assert link.producer_nonce is not None and link.nonce is not None
            expected = auth.welcome_proof(
                self._token, self.pipe, self._ident, link.producer_nonce, link.nonce
            )
            ok = auth.check(expected, msg.proof)
        if not ok:
            self._offend(link, "welcome without a valid proof of the job token", auth_failure=True)
            return
        assert link.producer_nonce is not None and link.nonce is not None
        link.session = auth.Session(
            self._token, self.pipe, self._ident, link.producer_nonce, link.nonce
        )
        link.admitted = True

    def _open_lanes(self, link: _Link, offer: LanesOffer) -> None:
        """The producer offered lanes: the link's channel connects them (a failure leaves the
        link on zmq frames); a link that asked for none refuses them."""
        refused = link.channel.offered(offer)
        if refused is not None:
            self._offend(link, refused)

    def _over_credit(self, link: _Link, header: ItemHeader) -> bool:
        """A producer that sends beyond the credit it was given would grow the queue without
        bound: its item is refused (it keeps it, unacknowledged)."""
        queued = sum(1 for lk, _ in self._queue if lk is link)
        if queued < self._max_queued:
            return False
        self._offend(link, f"item {header.seq} beyond credit ({queued} items already queued)")
        return True

    def _on_item(self, link: _Link, header: ItemHeader, frames: Sequence[Any]) -> None:
        if self._resend_of(link, header) is None and self._over_credit(link, header):
            return
        if header.flat is not None:
            self._on_lane_header(link, header, len(frames))
            return
        try:
            item = decode_item(
                frames,
                shm=self._shm if link.channel.shm else None,
                header=header,
                max_bytes=self.config.max_item_bytes,
            )
        except WireError as exc:
            self._offend(link, f"item {header.seq}: {exc}")
            return
        self._link_of_producer[item.producer] = link
        waiting = self._awaiting.pop(self._awaiting_key(link, header), None)
        if waiting is not None:
            waiting.resent = item  # the lost bytes came again: it keeps its place
            return
        if not self._seen.setdefault(item.producer, _Seen()).add(item.seq):
            self.stats.duplicates += 1
            self._control(link, CreditMsg(n=1, acks=[item.seq]))
            return
        self._queue.append((link, item))

    def _on_lane_header(self, link: _Link, header: ItemHeader, frames: int) -> None:
        """Queue an item whose bytes come over the link's bulk channel."""
        try:
            if frames != 1:
                raise WireError(f"{frames - 1} buffer frames with a flat payload")
            if not link.channel.had_receiver:
                raise WireError("a flat payload on a link that never had a bulk channel")
            total = check_flat(header, self.config.max_item_bytes)
            assert total is not None
            bulk = link.channel.receiver
            seen = self._seen.get(header.prod)
            if seen is not None and header.seq in seen:
                self.stats.duplicates += 1
                if bulk is not None and bulk.broken is None:
                    bulk.discard(header.seq, total, header)
                self._control(link, CreditMsg(n=1, acks=[header.seq]))
                return
            if bulk is not None and bulk.broken is None:
                bulk.expect(header.seq, total, header)
        except (WireError, ValueError) as exc:
            self._offend(link, f"item {header.seq}: {exc}")
            return
        self._link_of_producer[header.prod] = link
        entry = _LaneItem(header=header, total=total, lanes=bulk)
        self._queue.append((link, entry))
        if bulk is None:
            self._nack(link, [entry], "no bulk channel on this link", lanes=0)
        elif bulk.broken is not None:
            self._lanes_failed(link, bulk.broken)

    @staticmethod
    def _awaiting_key(link: _Link, header: ItemHeader) -> tuple[int, str, int]:
        return (id(link), header.prod, header.seq)

    def _resend_of(self, link: _Link, header: ItemHeader) -> _LaneItem | None:
        """The queued item this one re-sends (after a nack), if any."""
        return self._awaiting.get(self._awaiting_key(link, header))

    def _nack(self, link: _Link, entries: list[_LaneItem], reason: str, *, lanes: int) -> None:
        """Ask the producer to send these items again as zmq frames; they keep their place."""
        for e in entries:
            e.nacked = True
            e.arrived = time.monotonic()  # the lane timeout starts again for the resend
            self._awaiting[self._awaiting_key(link, e.header)] = e
        seqs = [e.seq for e in entries]
        for i in range(0, max(len(seqs), 1), MAX_ACKS):
            self._control(link, Nack(seqs=seqs[i : i + MAX_ACKS], lanes=lanes, reason=reason[:512]))

    def _lanes_failed(self, link: _Link, reason: str) -> None:
        """The link's bulk channel broke: close it, ask again for every item it still owed
        and for fresh lanes."""
        self.stats.event("lane_failed", link.address, reason)
        lanes = link.channel.broke()  # closes it; the fresh lanes to ask for (none over ucx)
        owed = [
            e
            for lk, e in self._queue
            if lk is link and isinstance(e, _LaneItem) and not e.nacked and e.resent is None
        ]
        self._nack(link, owed, reason, lanes=lanes)

    def _take_lane_item(self, link: _Link, entry: _LaneItem, deadline: float | None) -> Item | None:
        """Wait (heartbeating) for a lane item's bytes; ``None``: not yet, or dropped."""
        while entry.resent is None:
            step = self.config.heartbeat_s
            if deadline is not None:
                step = min(step, deadline - time.monotonic())
            if entry.nacked:  # its bytes come again as zmq frames
                self._receive(max(0, int(step * 1000)))
                if link.dropped:  # closed meanwhile: its unfinished items left the queue
                    return None
            else:
                flat = None
                if entry.lanes is not None and step > 0:
                    flat = entry.lanes.wait(entry.seq, entry.total, step)
                if flat is not None:
                    return self._finish_lane_item(link, entry, flat)
                broken = entry.lanes is None or entry.lanes.broken is not None
                late = time.monotonic() > entry.arrived + self.config.lane_timeout_s
                if broken or late:
                    why = (
                        "timed out" if not broken else (entry.lanes.broken if entry.lanes else None)
                    )
                    self._lanes_failed(link, why or "no bulk channel")
            self._heartbeat()
            if entry.resent is not None:
                break
            if entry.nacked and time.monotonic() > entry.arrived + self.config.lane_timeout_s:
                # not marked seen: the producer still holds it and sends it after a restart
                # or to another group
                self._queue.popleft()
                self._awaiting.pop(self._awaiting_key(link, entry.header), None)
                self.stats.event(
                    "item_dropped", link.address, f"item {entry.seq}: no bytes after a resend"
                )
                return None
            if deadline is not None and time.monotonic() >= deadline:
                return None
        item = entry.resent
        if not self._seen.setdefault(item.producer, _Seen()).add(item.seq):
            self._queue.popleft()
            self.stats.duplicates += 1
            self._control(link, CreditMsg(n=1, acks=[item.seq]))
            return None
        return item

    def _finish_lane_item(self, link: _Link, entry: _LaneItem, flat: memoryview) -> Item | None:
        try:
            item = decode_item([b""], flat=flat, header=entry.header)
        except WireError as exc:
            self._queue.popleft()
            self._offend(link, f"lane item {entry.seq}: {exc}")
            return None
        if not self._seen.setdefault(item.producer, _Seen()).add(item.seq):
            self._queue.popleft()  # a duplicate queued twice; ack it again
            self.stats.duplicates += 1
            self._control(link, CreditMsg(n=1, acks=[item.seq]))
            return None
        return item
