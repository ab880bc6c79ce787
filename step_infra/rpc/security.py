"""Optional ZeroMQ CURVE encryption and authentication of data links.

The producer is the CURVE server (its secret key stays with it); a consumer must know the
producer's public key, typically handed out with the job token. A consumer without the right
key completes no handshake, so it never says hello and receives nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import zmq


@dataclass(frozen=True, slots=True, kw_only=True)
class CurveKeys:
    """A Z85-encoded CURVE key pair."""

    public: bytes
    secret: bytes


def generate_keys() -> CurveKeys:
    """A fresh key pair; raises ValueError if this libzmq lacks CURVE."""
    if not zmq.has("curve"):
        raise ValueError("this libzmq was built without CURVE; install pyzmq wheels from PyPI")
    public, secret = zmq.curve_keypair()
    return CurveKeys(public=public, secret=secret)


def server_options(keys: CurveKeys) -> dict[int, Any]:
    """Socket options that make a producer's ROUTER a CURVE server."""
    return {zmq.CURVE_SERVER: 1, zmq.CURVE_SECRETKEY: keys.secret, zmq.CURVE_PUBLICKEY: keys.public}


def client_options(server_public: bytes) -> dict[int, Any]:
    """Socket options for a consumer's DEALER talking to the server ``server_public``."""
    own = generate_keys()
    return {
        zmq.CURVE_SERVERKEY: server_public,
        zmq.CURVE_PUBLICKEY: own.public,
        zmq.CURVE_SECRETKEY: own.secret,
    }
