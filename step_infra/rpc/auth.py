"""Proof of the job token on the data plane, without sending the token.

Why: the registry refuses calls without the job token, but a producer's socket is reachable by
anyone who can connect to its port. Without CURVE, a peer that never held the token could say
hello, take credit and receive items. So a producer with a token admits a member only when its
hello carries ``HMAC(token, "hello" | pipe | member | producer nonce | member nonce)``. The
producer nonce is the random *epoch* published in the producer's address (``;epoch=<hex>``), so
the first hello already proves the token with no extra round trip; the producer remembers the
member nonces it admitted under its epoch, so a captured hello cannot be replayed. A member
that does not know the epoch (an address written by hand, a restarted producer) is challenged
with a fresh nonce (``who``) and answers that. The producer replies ``welcome`` with the HMAC
under another label, so the member knows the producer holds the token too. Both derive a session key from the nonces; every later control
message of the member carries a counter and is followed by a MAC frame under that key, so a
peer that takes over a member's identity (after it disconnects) cannot ack or nack its items.

The token never travels; a captured handshake cannot be replayed (fresh nonces each time).
This authenticates; it does not encrypt: use CURVE (``security.py``) for that.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from step_infra.rpc.messages import NONCE_BYTES

MAC_BYTES = 16
TOKEN_ENV = "STEP_TOKEN"  # the job token every process of a job is started with


def token_bytes(token: str | bytes | None) -> bytes | None:
    """The token as bytes (``None`` or empty: the pipe is open to any peer)."""
    if not token:
        return None
    return token.encode() if isinstance(token, str) else bytes(token)


def resolve_token(explicit: str | bytes | None, registry_token: str | None) -> bytes | None:
    """The data-plane token: the one given, else the registry client's, else ``$STEP_TOKEN``."""
    return (
        token_bytes(explicit)
        or token_bytes(registry_token)
        or token_bytes(os.environ.get(TOKEN_ENV))
    )


def nonce() -> bytes:
    """A fresh random challenge."""
    return os.urandom(NONCE_BYTES)


EPOCH_PART = "epoch="


def with_epoch(address: str, epoch: bytes) -> str:
    """``address`` with the producer's epoch nonce appended as one more ``;``-part."""
    return f"{address};{EPOCH_PART}{epoch.hex()}"


def address_epoch(address: str) -> bytes | None:
    """The epoch nonce a producer published in ``address``, if any (malformed: ``None``)."""
    for part in address.split(";"):
        if part.startswith(EPOCH_PART):
            try:
                epoch = bytes.fromhex(part.removeprefix(EPOCH_PART))
            except ValueError:
                return None
            return epoch if len(epoch) == NONCE_BYTES else None
    return None


def _hmac(key: bytes, label: bytes, pipe: str, member: bytes, *parts: bytes) -> bytes:
    msg = b"\0".join([b"steprpc", label, pipe.encode(), member, *parts])
    return hmac.new(key, msg, hashlib.sha256).digest()


def hello_proof(
    token: bytes, pipe: str, member: bytes, producer_nonce: bytes, member_nonce: bytes
) -> bytes:
    """What a member sends to prove it holds ``token``."""
    return _hmac(token, b"hello", pipe, member, producer_nonce, member_nonce)


def welcome_proof(
    token: bytes, pipe: str, member: bytes, producer_nonce: bytes, member_nonce: bytes
) -> bytes:
    """What a producer sends back to prove it holds ``token``."""
    return _hmac(token, b"welcome", pipe, member, producer_nonce, member_nonce)


def check(expected: bytes, got: bytes | None) -> bool:
    """Constant-time comparison of a proof or MAC."""
    return got is not None and hmac.compare_digest(expected, got)


class Session:
    """One member's authenticated session: MACs and counters of its control messages."""

    __slots__ = ("_key", "last_counter")

    def __init__(
        self, token: bytes, pipe: str, member: bytes, producer_nonce: bytes, member_nonce: bytes
    ) -> None:
        self._key = _hmac(token, b"session", pipe, member, producer_nonce, member_nonce)
        self.last_counter = 0

    def mac(self, raw: bytes) -> bytes:
        """The MAC frame that follows ``raw``."""
        return hmac.new(self._key, raw, hashlib.sha256).digest()[:MAC_BYTES]

    def verify(self, raw: bytes, mac: bytes | None) -> bool:
        """Whether ``mac`` is ``raw``'s MAC under this session."""
        return check(self.mac(raw), mac)

    def next_counter(self) -> int:
        """The counter of the next message this end sends."""
        self.last_counter += 1
        return self.last_counter

    def accept_counter(self, counter: int) -> bool:
        """Whether a received ``counter`` is new (strictly increasing: no replays)."""
        if counter <= self.last_counter:
            return False
        self.last_counter = counter
        return True
