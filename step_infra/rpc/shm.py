"""Same-host payloads through shared memory: the producer copies tensor bytes once into a
reusable ``/dev/shm`` segment and sends only the header (with segment name and offsets) over
a Unix socket; the consumer maps the segment and wraps tensors without copying.

A segment is reused only after every receiving member acknowledged its item, and a consumer
acknowledges item N when the trainer takes item N+1, so tensors stay valid until then (the
:class:`~step_infra.rpc.dataset.PipeDataset` clones). Files live in ``/dev/shm`` (plain
``mmap``, so no resource-tracker surprises) and are unlinked on :meth:`ShmPool.close`. A
``kill -9`` leaves them behind: names carry the creating pid (``steprpc-<pid>-<hex>``) and every
new :class:`ShmPool` first unlinks the segments of pids that no longer run
(:func:`remove_stale_segments`); consumers still mapping one keep their mapping.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import socket
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PREFIX = "steprpc-"


def shm_available() -> bool:
    """Whether this host has a writable ``/dev/shm``."""
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


@dataclass(slots=True)
class Segment:
    """One mapped shared-memory file."""

    name: str
    size: int
    mm: mmap.mmap
    view: memoryview = field(init=False)

    def __post_init__(self) -> None:
        self.view = memoryview(self.mm)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_segments(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink ``steprpc-<pid>-*`` segments whose creating process is gone; returns their names.

    A reused pid keeps its segments (conservative: never removes a live producer's files).
    """
    removed: list[str] = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        pid_text, _, rest = name.removeprefix(PREFIX).partition("-")
        if not name.startswith(PREFIX) or not rest or not pid_text.isdigit():
            continue
        if int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
            continue
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.unlink(os.path.join(shm_dir, name))
            removed.append(name)
    if removed:
        log.info("removed %d stale shared-memory segments of dead processes", len(removed))
    return removed


def _create(size: int) -> Segment:
    name = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:16]}"
    fd = os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, max(size, 1))
        mm = mmap.mmap(fd, max(size, 1))
    finally:
        os.close(fd)
    return Segment(name=name, size=size, mm=mm)


class ShmPool:
    """Producer side: segments handed out per item and returned once it is acknowledged.

    Free segments are kept for reuse while all segments together stay within ``max_bytes``
    (the producer's in-flight bound); making a new one first unmaps free ones that do not fit.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self._free: list[Segment] = []
        self._all: list[Segment] = []
        self._max_bytes = max_bytes
        remove_stale_segments()

    @property
    def mapped_bytes(self) -> int:
        """Bytes of every segment this pool holds, in use or free."""
        return sum(seg.size for seg in self._all)

    def acquire(self, size: int) -> Segment:
        """A free segment of at least ``size`` bytes (reused when possible)."""
        fits = [i for i, seg in enumerate(self._free) if seg.size >= size]
        if fits:  # the smallest that fits, so large segments stay for large items
            return self._free.pop(min(fits, key=lambda i: self._free[i].size))
        if self._max_bytes is not None:
            self._free.sort(key=lambda seg: seg.size)
            while self._free and self.mapped_bytes + size > self._max_bytes:
                self._unlink(self._free.pop())  # the largest free segment first
        seg = _create(size)
        self._all.append(seg)
        return seg

    def trim(self) -> int:
        """Unmap every free segment; returns the bytes released."""
        freed = sum(seg.size for seg in self._free)
        for seg in self._free:
            self._unlink(seg)
        self._free.clear()
        return freed

    def _unlink(self, seg: Segment) -> None:
        self._all.remove(seg)
        with contextlib.suppress(BufferError):  # a view still out (zmq sending): unmapped by gc
            seg.view.release()
            seg.mm.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, seg.name))

    def release(self, seg: Segment) -> None:
        """Return a segment for reuse."""
        self._free.append(seg)

    def close(self) -> None:
        """Unmap and unlink every segment."""
        for seg in list(self._all):
            self._unlink(seg)
        self._free.clear()


class ShmReader:
    """Consumer side: maps segments by name once and returns views into them. At most
    ``keep`` mappings are kept (least recently used dropped first: a producer unlinks and
    replaces segments, and a mapping kept for ever would keep their pages)."""

    def __init__(self, keep: int = 64) -> None:
        self._maps: OrderedDict[str, tuple[mmap.mmap, memoryview]] = OrderedDict()
        self._keep = keep

    def view(self, name: str, offset: int, nbytes: int) -> memoryview:
        """``nbytes`` at ``offset`` of segment ``name``; raises ValueError if out of range."""
        if not name.startswith(PREFIX) or "/" in name:
            raise ValueError(f"shared-memory name {name!r}; expected '{PREFIX}<hex>'")
        entry = self._maps.get(name)
        if entry is None:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY)
            try:
                mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            entry = (mm, memoryview(mm))
            self._maps[name] = entry
            while len(self._maps) > self._keep:
                self._maps.popitem(last=False)  # tensors still using it keep it mapped
        else:
            self._maps.move_to_end(name)
        if offset < 0 or nbytes < 0 or offset + nbytes > len(entry[1]):
            raise ValueError(f"range {offset}+{nbytes} outside segment {name!r}")
        return entry[1][offset : offset + nbytes]

    def close(self) -> None:
        """Drop the mappings (views still held by tensors keep them alive)."""
        self._maps.clear()


def shm_address(ipc_address: str) -> str:
    """The published form of a same-host shm endpoint: ``shm://<hostname><ipc path>``."""
    return f"shm://{socket.gethostname()}{ipc_address.removeprefix('ipc://')}"


def select_endpoint(address: str, force: str | None = None) -> tuple[str, bool]:
    """Pick the zmq address to connect to and whether payloads come through shm.

    ``address`` is a producer's published address: ``tcp://h:p`` (or ``ucx://h:p``) optionally
    followed by ``;shm://<hostname>/path``. Same host -> shm unless ``force`` names another
    transport; ``force="tcp"`` turns a ``ucx://`` endpoint into its plain tcp link.
    """
    parts = [p for p in address.split(";") if "://" in p]  # other parts: e.g. auth's epoch
    tcp = next((p for p in parts if not p.startswith("shm://")), None)
    shm = next((p for p in parts if p.startswith("shm://")), None)
    if force not in (None, "tcp", "shm", "ucx"):
        raise ValueError(f"force {force!r}; expected None, 'tcp', 'shm' or 'ucx'")
    if (shm is not None and force is None) or force == "shm":
        host, _, path = (shm or "").removeprefix("shm://").partition("/")
        if shm is not None and host == socket.gethostname() and shm_available():
            return f"ipc:///{path}", True
    if force == "shm":
        raise ValueError(f"address {address!r} offers no same-host shm endpoint; drop force='shm'")
    if tcp is None:
        raise ValueError(f"address {address!r} has no tcp endpoint")
    if force == "ucx" and not tcp.startswith("ucx://"):
        raise ValueError(
            f"address {address!r} offers no ucx endpoint; start the producer with "
            "ProducerConfig(transport='ucx') or drop transport='ucx'"
        )
    if force == "tcp" and tcp.startswith("ucx://"):
        tcp = "tcp://" + tcp.removeprefix("ucx://")  # the same zmq endpoint, without UCX
    return tcp, False
