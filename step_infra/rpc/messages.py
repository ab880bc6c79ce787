"""The schema of every StepRPC message a peer can send, checked before anything is used.

Why a schema: a pipe's two ends trust nothing the other sends. Each message kind is a
``msgspec`` struct tagged by its ``k`` field, with the types and ranges its fields may take
(credits, sizes, lane counts, shapes and offsets bounded by :data:`LIMITS`), so a hello with
``credit="x"`` or an item announcing ``2**50`` bytes is refused by the decoder with a reason
(``Expected `int`, got `str` - at `$.credit```) instead of failing later inside the producer or
consumer. msgspec decodes and validates in one pass in C, so the check costs less than the
hand-written ``msgpack`` + ``isinstance`` code it replaces.

Directions: :data:`TO_PRODUCER` are what consumer members send (``hello``, ``credit``, ``ack``,
``nack``, ``bye``); :data:`TO_CONSUMER` are what producers send (``who``, ``welcome``,
``lanes`` and item headers). :func:`decode` never raises: it returns the message or the reason
it was refused, which callers count against the peer (``guard.py``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

WIRE_VERSION = 1

MAX_NAME = 256  # pipe, producer, group and tensor names, in characters
MAX_CREDIT = 1 << 16  # credits one message may return (a member holds at most this many)
MAX_ACKS = 4096  # sequence numbers one credit/ack/nack message may carry
MAX_SEQ = (1 << 63) - 1
MAX_TENSORS = 4096
MAX_DIMS = 32
MAX_DIM = 1 << 40
MAX_LANES = 64
MAX_CONTROL_BYTES = 1 << 20  # a control message is a few hundred bytes; acks lists stay far below
NONCE_BYTES = 16
PROOF_BYTES = 32  # HMAC-SHA256

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
Seqs = Annotated[list[Seq], msgspec.Meta(max_length=MAX_ACKS)]
Credit = Annotated[int, msgspec.Meta(ge=0, le=MAX_CREDIT)]
Lanes = Annotated[int, msgspec.Meta(ge=0, le=MAX_LANES)]
Nonce = Annotated[bytes, msgspec.Meta(min_length=NONCE_BYTES, max_length=NONCE_BYTES)]
Proof = Annotated[bytes, msgspec.Meta(min_length=PROOF_BYTES, max_length=PROOF_BYTES)]
Counter = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
Dim = Annotated[int, msgspec.Meta(ge=0, le=MAX_DIM)]
Shape = Annotated[list[Dim], msgspec.Meta(max_length=MAX_DIMS)]
Offset = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
# where a tensor was on its producer: host memory, or a CUDA device (the consumer's
# ConsumerConfig.device decides where it goes; see consumer.target_device)
DEVICE_KINDS = ("cpu", "cuda")
DeviceKind = Literal["cpu", "cuda"]


class _Message(msgspec.Struct, tag_field="k", omit_defaults=True):
    """Fields a message does not know are ignored (a newer peer may add some)."""


# ------------------------------------------------------------------ consumer -> producer
class Hello(_Message, tag="hello"):
    """A member joins ``group`` with ``credit`` items of room. Under a job token it carries
    ``proof`` over the producer's nonce ``pnonce`` (the epoch in its address, or the nonce of a
    :class:`Who` challenge) and its own ``nonce`` (``auth.py``)."""

    group: Name
    credit: Credit = 1
    shm: bool = False
    size: Annotated[int, msgspec.Meta(ge=0, le=1 << 16)] = 0  # members the group has (0: unknown)
    lanes: Lanes = 0
    ucx: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    pnonce: Nonce | None = None  # the producer's nonce it answers (its epoch, or a challenge)
    nonce: Nonce | None = None  # the member's half of the session
    proof: Proof | None = None


class CreditMsg(_Message, tag="credit"):
    """``n`` more items of room (0: a heartbeat), and the items it acknowledges."""

    n: Credit = 1
    acks: Seqs = []
    c: Counter = 0  # message counter of an authenticated session (replays are refused)


class Ack(_Message, tag="ack"):
    """Acknowledges ``acks`` without returning credit (``ack="manual"``)."""

    acks: Seqs = []
    c: Counter = 0


class Nack(_Message, tag="nack"):
    """The member lost these items' bytes (a lane broke, or they never arrived): send them
    again over zmq frames, and offer ``lanes`` fresh lanes (0: stay on zmq)."""

    seqs: Seqs = []
    lanes: Lanes = 0
    reason: Annotated[str, msgspec.Meta(max_length=512)] = ""
    c: Counter = 0


class Bye(_Message, tag="bye"):
    """The member leaves; its group's unacknowledged items go elsewhere."""

    c: Counter = 0


# ------------------------------------------------------------------ producer -> consumer
class Who(_Message, tag="who"):
    """The producer does not know this member (it restarted, or the member must prove the job
    token): say hello again, answering ``nonce`` when the pipe has a token."""

    nonce: Nonce | None = None


class Welcome(_Message, tag="welcome"):
    """The member joined; under a job token ``proof`` shows the producer holds it too."""

    proof: Proof | None = None


class LanesOffer(_Message, tag="lanes"):
    """Connect ``n`` lanes to ``port`` on the producer's host, presenting ``token``."""

    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    token: Nonce
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_LANES)]


class ItemHeader(_Message, tag="item"):
    """One item: names, dtypes and shapes of its tensors, and where their bytes are (buffer
    frames after the header; ``shm`` segment at ``offs``; or one ``flat`` payload of that
    many bytes over a bulk channel, tensors at ``offs``). ``devs``: per tensor, ``"cuda"`` when
    it was a CUDA tensor on the producer (its bytes travel as host bytes all the same); absent
    when every tensor was on the CPU, so such headers are what older peers send and read."""

    v: int
    pipe: Name
    prod: Name
    seq: Seq
    names: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=MAX_NAME)]],
        msgspec.Meta(max_length=MAX_TENSORS),
    ]
    dtypes: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=32)]], msgspec.Meta(max_length=MAX_TENSORS)
    ]
    shapes: Annotated[list[Shape], msgspec.Meta(max_length=MAX_TENSORS)]
    meta: dict[str, Any] = {}
    shm: Annotated[str, msgspec.Meta(max_length=MAX_NAME)] | None = None
    offs: Annotated[list[Offset], msgspec.Meta(max_length=MAX_TENSORS)] | None = None
    flat: Offset | None = None
    sizes: Annotated[list[Offset], msgspec.Meta(max_length=MAX_TENSORS)] | None = None
    devs: Annotated[list[DeviceKind], msgspec.Meta(max_length=MAX_TENSORS)] | None = None


ToProducer = Hello | CreditMsg | Ack | Nack | Bye
ToConsumer = Who | Welcome | LanesOffer | ItemHeader

_ENCODER = msgspec.msgpack.Encoder()
_TO_PRODUCER = msgspec.msgpack.Decoder(ToProducer)
_TO_CONSUMER = msgspec.msgpack.Decoder(ToConsumer)
_HEADER = msgspec.msgpack.Decoder(ItemHeader)


def encode(msg: msgspec.Struct) -> bytes:
    """The wire bytes of one message."""
    return _ENCODER.encode(msg)


def _decode(decoder: msgspec.msgpack.Decoder[Any], raw: bytes | memoryview) -> Any | str:
    if len(raw) > MAX_CONTROL_BYTES:
        return f"{len(raw)}-byte message exceeds {MAX_CONTROL_BYTES}"
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        return f"invalid message: {exc}"
    except Exception as exc:  # DecodeError, RecursionError on absurd nesting, ...
        return f"not a StepRPC message: {type(exc).__name__}: {exc}"


def decode_to_producer(raw: bytes | memoryview) -> ToProducer | str:
    """A consumer's message, or why it was refused."""
    return _decode(_TO_PRODUCER, raw)  # type: ignore[no-any-return]


def decode_to_consumer(raw: bytes | memoryview) -> ToConsumer | str:
    """A producer's message (control or item header), or why it was refused."""
    msg = _decode(_TO_CONSUMER, raw)
    if isinstance(msg, ItemHeader) and msg.v != WIRE_VERSION:
        return f"wire version {msg.v!r}; expected {WIRE_VERSION}"
    return msg  # type: ignore[no-any-return]


def decode_header(raw: bytes | memoryview) -> ItemHeader | str:
    """An item header, or why it was refused."""
    msg = _decode(_HEADER, raw)
    if isinstance(msg, ItemHeader) and msg.v != WIRE_VERSION:
        return f"wire version {msg.v!r}; expected {WIRE_VERSION}"
    return msg  # type: ignore[no-any-return]
