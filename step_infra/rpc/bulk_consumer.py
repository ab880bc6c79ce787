"""The consumer's side of a link's bulk channel, and the factory that picks it.

:func:`link_channel` is the one place that decides, from the address a consumer connects to,
what its hello asks for and where flat items' bytes arrive
(:class:`~step_infra.rpc.bulk.LinkChannel`):

* :class:`FramesLink`: nothing beside zmq; with ``shm`` the headers point into the producer's
  shared-memory segments (same host), else every byte is a zmq frame (lanes off, CURVE, ipc);
* :class:`LaneLink`: asks for tcp lanes and connects them when the producer offers them;
* :class:`UcxLink`: listens for the producer's UCX endpoint before saying hello, and again
  (a fresh listener) when the producer restarted.

A channel never offered lanes refuses an offer (the consumer counts it as an offence): only a
link that asked for lanes opens connections to a port a producer names.
"""

from __future__ import annotations

import logging

from step_infra.rpc.bulk import BulkAsk, BulkReceiver, LinkChannel
from step_infra.rpc.lanes import LaneReceiver
from step_infra.rpc.messages import LanesOffer
from step_infra.rpc.transport import Transport
from step_infra.rpc.ucx import UcxReceiver

log = logging.getLogger(__name__)

NOT_ASKED = "lanes offered on a link that asked for none"


class FramesLink:
    """No bulk receiver: items as zmq frames, or (``shm``) as views of shared memory."""

    def __init__(self, *, shm: bool = False) -> None:
        self._shm = shm

    @property
    def shm(self) -> bool:
        return self._shm

    @property
    def receiver(self) -> BulkReceiver | None:
        return None

    @property
    def had_receiver(self) -> bool:
        return False

    def ask(self) -> BulkAsk:
        return BulkAsk(shm=self._shm)

    def offered(self, offer: LanesOffer) -> str | None:
        return NOT_ASKED

    def broke(self) -> int:
        return 0

    def restart(self) -> None:
        pass

    def close(self) -> None:
        pass


class _NetworkLink:
    """What the lane and ucx links share: a receiver of large items' bytes (or none yet),
    never shared memory, and closing that receiver."""

    _receiver: BulkReceiver | None

    @property
    def shm(self) -> bool:
        return False

    @property
    def receiver(self) -> BulkReceiver | None:
        return self._receiver

    def close(self) -> None:
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None


class LaneLink(_NetworkLink):
    """Asks for ``lanes`` tcp lanes in every hello and nack; connects each offer."""

    def __init__(
        self,
        host: str,
        lanes: int,
        *,
        pipe: str,
        pool_keep: int,
        max_item_bytes: int,
        max_items: int,
        pin: bool = False,
    ) -> None:
        self._host = host
        self._pin = pin
        self._lanes = lanes
        self._pipe = pipe
        self._pool_keep = pool_keep
        self._max_item_bytes = max_item_bytes
        self._max_items = max_items
        self._receiver = None
        self._had = False

    @property
    def had_receiver(self) -> bool:
        return self._had

    def ask(self) -> BulkAsk:
        return BulkAsk(lanes=self._lanes)

    def offered(self, offer: LanesOffer) -> str | None:
        """Connect the offered lanes (a failure leaves the link on zmq frames)."""
        self.close()
        try:
            self._receiver = LaneReceiver(
                self._host,
                offer.port,
                offer.token,
                min(offer.n, self._lanes),
                pool_keep=self._pool_keep,
                max_item_bytes=self._max_item_bytes,
                max_items=self._max_items,
                pin=self._pin,
            )
            self._had = True
        except OSError as exc:
            log.warning("pipe %s: lanes offered but not connected (%s); using zmq", self._pipe, exc)
        return None

    def broke(self) -> int:
        self.close()
        return self._lanes

    def restart(self) -> None:
        pass  # the producer offers fresh lanes in answer to the new hello


class UcxLink(_NetworkLink):
    """A UCX listener the producer opens an endpoint to; its address goes in the hello."""

    def __init__(self, host: str, *, pool_keep: int) -> None:
        self._host = host
        self._pool_keep = pool_keep
        self._ucx: UcxReceiver | None = UcxReceiver(host, pool_keep)
        self._receiver = self._ucx

    @property
    def had_receiver(self) -> bool:
        return True

    def ask(self) -> BulkAsk:
        return BulkAsk(ucx=self._ucx.address if self._ucx is not None else None)

    def offered(self, offer: LanesOffer) -> str | None:
        return NOT_ASKED

    def broke(self) -> int:
        self.close()
        return 0  # a ucx link asks for no lanes: its items come as zmq frames until a restart

    def restart(self) -> None:
        """A new producer process: a fresh listener for its endpoint."""
        self.close()
        self._ucx = UcxReceiver(self._host, self._pool_keep)
        self._receiver = self._ucx

    def close(self) -> None:
        super().close()
        self._ucx = None


def link_channel(
    transport: Transport,
    address: str,
    *,
    pipe: str,
    shm: bool,
    encrypted: bool,
    lanes: int,
    pool_keep: int,
    max_item_bytes: int,
    max_items: int,
    pin: bool = False,
) -> LinkChannel:
    """The channel of a link to ``address`` over ``transport``: shm when the endpoint is the
    producer's same-host one, else the transport's first bulk channel this link may use (lanes
    are never used under CURVE, which they would bypass), else zmq frames. ``pin``: lanes
    receive into page-locked buffers (the consumer copies items to its CUDA device)."""
    if shm:
        return FramesLink(shm=True)
    host = address.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
    for kind in transport.bulk:
        if kind == "ucx":
            return UcxLink(host, pool_keep=pool_keep)
        if kind == "lanes" and lanes > 0 and not encrypted:
            return LaneLink(
                host,
                lanes,
                pipe=pipe,
                pool_keep=pool_keep,
                max_item_bytes=max_item_bytes,
                max_items=max_items,
                pin=pin,
            )
    return FramesLink()
