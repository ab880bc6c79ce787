"""The bulk-channel interfaces: how a large item's tensor bytes travel beside its zmq header.

Every link carries its control messages and item headers over zmq, in order. The bytes of an
item may take another way, and there really are several: as zmq frames (the fallback every
link has), through same-host shared memory (``shm.py``), over parallel plain TCP lanes
(``lanes.py``) or as UCX tagged messages (``ucx.py``). Each end talks to its peer's channel
through one interface, and picks it in one place (a factory), so neither the producer nor the
consumer branches on a transport's name:

* producer, one per consumer member: :class:`BulkChannel` (``bulk_producer.py``; picked by
  :meth:`~step_infra.rpc.bulk_producer.ProducerBulk.channel_for` from the member's hello);
* consumer, one per producer link: :class:`LinkChannel` (``bulk_consumer.py``; picked by
  :func:`~step_infra.rpc.bulk_consumer.link_channel` from the address it connects to).

Below them, the byte movers of the two network channels share one small interface on each
side: :class:`BulkSender` (``LaneSender``, ``UcxSender``) and :class:`BulkReceiver`
(``LaneReceiver``, ``UcxReceiver``). A broken mover is never repaired in place: its item bytes
are asked for again (``nack``) and come as zmq frames, and the channel is renewed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from step_infra.rpc.wire import to_flat_frames

if TYPE_CHECKING:
    from step_infra.rpc.messages import ItemHeader, LanesOffer
    from step_infra.rpc.shm import Segment

# the header frame announcing one flat payload, its buffers, their offsets in it, its size
FlatFrames = tuple[bytes, list[memoryview], list[int], int]
# hands zmq frames to the member; False: it is unreachable
SendFrames = Callable[[list[Any]], bool]


@dataclass(slots=True)
class Outgoing:
    """One item's bytes in the forms its members' channels send: its zmq ``frames`` (the
    caller's buffers, or views into its segment once copied there), its shared-memory copy
    (made when the first shm member takes it) and its flat layout (lanes, ucx). Each form is
    made once, however many members take it."""

    frames: list[Any]
    nbytes: int
    shm_frames: list[bytes] | None = None
    segment: Segment | None = None
    flat: FlatFrames | None = field(default=None, repr=False)

    def flat_frames(self) -> FlatFrames:
        """The item as a flat-payload header plus its buffers (made on first use)."""
        if self.flat is None:
            self.flat = to_flat_frames(self.frames)
        return self.flat


@dataclass(frozen=True, slots=True)
class BulkAsk:
    """What a member's hello asks of the producer's channels (its ``shm``, ``lanes`` and
    ``ucx`` fields)."""

    shm: bool = False
    lanes: int = 0
    ucx: str | None = None


# ------------------------------------------------------------------------------ producer
class BulkSender(Protocol):
    """Moves one member's flat items off the zmq link (``LaneSender``, ``UcxSender``)."""

    @property
    def broken(self) -> bool:
        """Whether it failed (items go as zmq frames until the member asks for fresh ones)."""
        ...

    def send(
        self, seq: int, buffers: Sequence[memoryview], offsets: Sequence[int], total: int
    ) -> None:
        """Queue item ``seq``'s buffers; they stay alive until the item is acknowledged."""
        ...

    def close(self) -> None:
        """Stop and close its connections."""
        ...


class BulkChannel(Protocol):
    """Producer side, one per consumer member: how that member's items leave the producer."""

    @property
    def sender(self) -> BulkSender | None:
        """What carries large items' bytes now; ``None``: zmq frames (or shared memory)."""
        ...

    def ready(self) -> bool:
        """Whether a large item may go now (lanes still connecting hold it back a while)."""
        ...

    def send(self, seq: int, item: Outgoing, *, big: bool, out: SendFrames) -> bool:
        """Send item ``seq``: its frames through ``out`` and, for a ``big`` item on a bulk
        channel, its bytes after its header went. ``False``: the member is unreachable."""
        ...

    def resend(self, item: Outgoing, out: SendFrames) -> bool:
        """Send an item whose bulk bytes the member lost again, as frames only."""
        ...

    def renew(self, lanes: int) -> BulkChannel:
        """The channel to use after a nack, this one closed (fresh lanes when ``lanes``)."""
        ...

    def close(self) -> None:
        """Release its connections (idempotent)."""
        ...


# ------------------------------------------------------------------------------ consumer
class BulkReceiver(Protocol):
    """Receives one link's flat items into reused buffers (``LaneReceiver``, ``UcxReceiver``)."""

    @property
    def broken(self) -> str | None:
        """Why it stopped working, or ``None``."""
        ...

    def expect(self, seq: int, total: int, header: ItemHeader) -> None:
        """Item ``seq``'s header announced ``total`` flat bytes (raises ``ValueError`` when the
        announcement is refused)."""
        ...

    def wait(self, seq: int, total: int, timeout_s: float) -> memoryview | None:
        """Item ``seq``'s bytes once all arrived; ``None`` on timeout or when broken."""
        ...

    def discard(self, seq: int, total: int, header: ItemHeader) -> None:
        """Item ``seq`` is a duplicate: take its bytes off the wire and drop them."""
        ...

    def close(self) -> None:
        """Close its connections and wake any waiter."""
        ...


class LinkChannel(Protocol):
    """Consumer side, one per producer link: what the link asks for and receives bytes on."""

    @property
    def shm(self) -> bool:
        """Whether item headers point into shared memory (decoded with the shm reader)."""
        ...

    @property
    def receiver(self) -> BulkReceiver | None:
        """Where flat items' bytes arrive now; ``None``: none open (they are asked again)."""
        ...

    @property
    def had_receiver(self) -> bool:
        """Whether one was ever open (flat items are only valid on such a link)."""
        ...

    def ask(self) -> BulkAsk:
        """The hello fields that ask the producer for this channel."""
        ...

    def offered(self, offer: LanesOffer) -> str | None:
        """The producer offered lanes: connect them; a reason when the offer is refused."""
        ...

    def broke(self) -> int:
        """Close the broken receiver; returns the fresh lanes the nack asks for."""
        ...

    def restart(self) -> None:
        """The producer asked who we are (it restarted): ready the channel for a new hello."""
        ...

    def close(self) -> None:
        """Close the receiver (idempotent)."""
        ...
