"""Property-based fuzzing (hypothesis) of the wire format and of every control message.

Two levels: the decoders on their own (any bytes, any msgpack value, any field of any message
kind with any type) only ever return a message or a reason, and ``decode_item`` only ever
raises ``WireError``; then the same values through real sockets into a real producer and a
real consumer, whose public calls must never raise while a well-behaved peer on the same pipe
still gets its items. Examples are few per run (CI has 2 cores) but different each run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from step_infra.rpc import messages
from step_infra.rpc.consumer import Consumer, ConsumerConfig
from step_infra.rpc.producer import Producer, ProducerConfig
from step_infra.rpc.wire import WireError, decode_item, encode_item

sys.path.insert(0, str(Path(__file__).parent))
import contextlib

from hostile import FakeProducer, RawPeer, item_header, pack

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# values a peer can put in any field: every msgpack type, edge-case numbers, nesting
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**50, 2**63 - 1, 2**64 - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)

KINDS = ["hello", "credit", "ack", "nack", "bye", "who", "welcome", "lanes", "item", "zz"]
FIELDS = [
    "k", "v", "group", "credit", "shm", "size", "lanes", "ucx", "pnonce", "nonce", "proof",
    "n", "acks", "seqs", "reason", "c", "port", "token", "pipe", "prod", "seq", "names",
    "dtypes", "shapes", "meta", "offs", "flat", "sizes",
]  # fmt: skip


@st.composite
def messages_of_any_kind(draw: st.DrawFn) -> dict[str, Any]:
    """A map with a known (or unknown) kind and any subset of every field, any typed."""
    msg = draw(st.dictionaries(st.sampled_from(FIELDS), values, max_size=8))
    msg["k"] = draw(st.one_of(st.sampled_from(KINDS), values))
    return msg


@st.composite
def mutated_headers(draw: st.DrawFn) -> dict[str, Any]:
    """A valid item header with some fields replaced by anything."""
    head = item_header(draw(st.integers(0, 10)))
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
        head[key] = draw(values)
    return head


@given(st.binary(max_size=300))
@FUZZ
def test_any_bytes_decode_to_a_message_or_a_reason(raw: bytes) -> None:
    for decode in (messages.decode_to_producer, messages.decode_to_consumer):
        out = decode(raw)
        assert isinstance(out, (str, messages.ToProducer, messages.ToConsumer))


@given(messages_of_any_kind())
@FUZZ
def test_any_control_message_decodes_to_a_valid_message_or_a_reason(msg: dict[str, Any]) -> None:
    raw = pack(msg)
    for decode in (messages.decode_to_producer, messages.decode_to_consumer):
        out = decode(raw)
        if isinstance(out, str):
            continue
        # what the decoder lets through is within the schema's limits
        for name in ("credit", "n"):
            value = getattr(out, name, 0)
            assert isinstance(value, int) and 0 <= value <= messages.MAX_CREDIT
        for name in ("acks", "seqs"):
            seqs = getattr(out, name, [])
            assert len(seqs) <= messages.MAX_ACKS
            assert all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seqs)


@given(mutated_headers(), st.lists(st.binary(max_size=64), max_size=3))
@FUZZ
def test_decode_item_only_raises_wire_error(head: dict[str, Any], buffers: list[bytes]) -> None:
    try:
        item = decode_item([pack(head), *buffers], max_bytes=1 << 20)
    except WireError:
        return
    for tensor, buf in zip(item.tensors.values(), buffers, strict=False):
        assert tensor.numel() * tensor.element_size() == len(buf)


@given(st.integers(0, 200), st.binary(min_size=1, max_size=4))
@FUZZ
def test_bit_flips_in_a_real_header_only_raise_wire_error(pos: int, junk: bytes) -> None:
    frames = encode_item(pipe="p", producer="a", seq=3, tensors={"x": torch.ones(4, 4)})
    head = bytearray(frames[0])
    at = pos % len(head)
    head[at : at + len(junk)] = junk
    with contextlib.suppress(WireError):
        decode_item([bytes(head), bytes(frames[1])])


def test_fuzzed_control_traffic_never_raises_out_of_a_producer() -> None:
    # under the job token, as every job runs: an open pipe would let a fuzzed hello join the
    # real consumer's group (or take spray credit) and starve it by design, not by a bug
    cfg = ProducerConfig(shm=False, max_offences=10**9, token="t")  # keep listening to it
    with Producer("p", config=cfg) as prod, RawPeer(prod, b"fuzz/0") as fuzzer:
        cons = Consumer(
            "p", [prod.address], group="g", config=ConsumerConfig(transport="tcp", token="t")
        )
        prod.wait_for_consumers()
        sent = 0

        @given(messages_of_any_kind(), st.integers(0, 2))
        @FUZZ
        def fuzz(msg: dict[str, Any], extra_frames: int) -> None:
            nonlocal sent
            fuzzer.send(pack(msg), *[b"\0" * 16] * extra_frames)
            prod.poll(1)
            prod.send({"x": torch.full((4,), float(sent))})
            sent += 1
            item = cons.get(timeout_s=5)
            assert item is not None, "the real consumer stopped getting items"

        fuzz()
        prod.poll(50)
        assert prod.stats.malformed > 0  # the fuzzer's garbage did arrive and was refused
        assert set(prod.groups()) == {"g"}  # and it never joined
        cons.close()


def test_fuzzed_producer_traffic_never_raises_out_of_a_consumer() -> None:
    with FakeProducer() as fake:
        cfg = ConsumerConfig(transport="tcp", max_offences=10**9, lane_timeout_s=0.2)
        cons = Consumer("p", [fake.address], group="g", config=cfg)
        fake.wait_hello()
        seq = 0

        @given(
            st.one_of(messages_of_any_kind(), mutated_headers()),
            st.lists(st.binary(max_size=64), max_size=2),
        )
        @FUZZ
        def fuzz(msg: dict[str, Any], buffers: list[bytes]) -> None:
            nonlocal seq
            fake.send(pack(msg), *buffers)
            cons.get(timeout_s=0.001)  # may or may not yield something; must not raise
            # and a good item right after still arrives
            seq += 1
            good = item_header(1000 + seq)
            fake.send(pack(good), torch.full((4,), 1.0).numpy().tobytes())
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                item = cons.get(timeout_s=0.05)
                if item is not None and item.seq == 1000 + seq:
                    return
            raise AssertionError("a good item after fuzzed traffic never arrived")

        fuzz()
        assert cons.stats.malformed > 0
        cons.close()


def test_header_limits_are_what_the_docs_say() -> None:
    """The bounds the schema enforces are the documented constants (a change is deliberate)."""
    assert messages.MAX_TENSORS == 4096 and messages.MAX_ACKS == 4096
    assert messages.MAX_CONTROL_BYTES == 1 << 20
    too_many = {"k": "credit", "acks": list(range(messages.MAX_ACKS + 1))}
    assert isinstance(messages.decode_to_producer(msgpack.packb(too_many)), str)
