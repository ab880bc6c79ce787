"""Offences of misbehaving peers: counted, logged once per peer, and banned when repeated.

Why: a buggy or hostile peer must neither stop a pipe nor flood its log. Every message a
producer or consumer refuses (it fails the schema, its MAC, its proof, or sizes it announces)
is an offence of the peer that sent it: the first is logged as a warning with its reason, the
rest at debug level, and after ``max_offences`` the peer is banned for ``ban_s`` seconds (its
messages are then ignored and counted as refused). Peers are tracked in a bounded LRU table, so
a peer inventing a new identity per message cannot grow it without bound.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Record:
    offences: int = 0
    banned_until: float = 0.0
    last_reason: str = ""


class PeerGuard:
    """Offence counts per peer (a zmq identity, a link address)."""

    def __init__(
        self, what: str, *, max_offences: int = 8, ban_s: float = 60.0, track: int = 4096
    ) -> None:
        if max_offences < 1:
            raise ValueError(f"max_offences {max_offences}; expected >= 1")
        self._what = what
        self._max = max_offences
        self._ban_s = ban_s
        self._track = track
        self._peers: OrderedDict[bytes | str, _Record] = OrderedDict()
        self.offences = 0
        self.bans = 0

    def banned(self, peer: bytes | str) -> bool:
        """Whether ``peer``'s messages are to be ignored now."""
        rec = self._peers.get(peer)
        if rec is None or not rec.banned_until:
            return False
        if time.monotonic() < rec.banned_until:
            return True
        rec.banned_until = 0.0  # served its ban: a fresh start
        rec.offences = 0
        return False

    def offend(self, peer: bytes | str, reason: str) -> bool:
        """Count one offence of ``peer``; ``True`` when it is now banned (drop it)."""
        self.offences += 1
        rec = self._peers.get(peer)
        if rec is None:
            rec = self._peers[peer] = _Record()
            if len(self._peers) > self._track:
                self._peers.popitem(last=False)
        else:
            self._peers.move_to_end(peer)
        rec.offences += 1
        rec.last_reason = reason
        if rec.offences == 1:
            log.warning("%s: refused a message from %r: %s", self._what, peer, reason)
        else:
            log.debug("%s: refused a message from %r: %s", self._what, peer, reason)
        if rec.offences >= self._max and not rec.banned_until:
            rec.banned_until = time.monotonic() + self._ban_s
            self.bans += 1
            log.warning(
                "%s: dropped %r for %.0f s after %d refused messages (last: %s)",
                self._what,
                peer,
                self._ban_s,
                rec.offences,
                reason,
            )
            return True
        return False

    def reasons(self) -> dict[str, str]:
        """The last reason per offending peer (for reports and tests)."""
        return {repr(p): r.last_reason for p, r in self._peers.items() if r.offences}
