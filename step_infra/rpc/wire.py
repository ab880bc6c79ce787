"""StepRPC wire format: one msgpack header frame, then one raw buffer frame per tensor.

Why this shape: the header is small and self-describing (pipe, producer, sequence number,
tensor names, dtypes, shapes, metadata), and the tensor bytes travel as separate frames so
that pyzmq can send them with ``copy=False`` and the consumer can wrap them with
``torch.frombuffer`` without another copy. Nothing on the wire is pickled: a hostile or
corrupt peer can at worst make :func:`decode_item` raise :class:`WireError`, which callers
count and drop.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

WIRE_VERSION = 1
KIND_ITEM = "item"

# Every dtype a tensor on the wire may have, by its wire name.
_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
for _name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        _DTYPES[_name] = getattr(torch, _name)
_NAMES: dict[torch.dtype, str] = {v: k for k, v in _DTYPES.items()}
del _name

MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 4096


class WireError(ValueError):
    """A frame set that is not a valid StepRPC item (malformed, truncated or inconsistent)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Item:
    """One decoded item: its origin, its tensors and its small metadata dict."""

    pipe: str
    producer: str
    seq: int
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        """The de-duplication key ``(producer, seq)``."""
        return (self.producer, self.seq)

    @property
    def nbytes(self) -> int:
        """Total tensor payload in bytes."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def supported_dtypes() -> tuple[torch.dtype, ...]:
    """The torch dtypes the wire format carries."""
    return tuple(_DTYPES.values())


def tensor_buffer(tensor: torch.Tensor) -> memoryview:
    """A byte view of ``tensor`` (made contiguous, moved to CPU) without copying when possible."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype not in _NAMES:
        raise ValueError(
            f"tensor dtype {t.dtype} is not supported on the wire; expected one of "
            f"{sorted(_DTYPES)}"
        )
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def encode_item(
    *,
    pipe: str,
    producer: str,
    seq: int,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> list[bytes | memoryview]:
    """Frames for one item: ``[header, buffer_0, buffer_1, ...]``; buffers are not copied."""
    names: list[str] = []
    dtypes: list[str] = []
    shapes: list[list[int]] = []
    buffers: list[bytes | memoryview] = []
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"item field {name!r} is a {type(tensor).__name__}; expected a tensor")
        buf = tensor_buffer(tensor)
        names.append(str(name))
        dtypes.append(_NAMES[tensor.dtype])
        shapes.append(list(tensor.shape))
        buffers.append(buf)
    header = {
        "v": WIRE_VERSION,
        "k": KIND_ITEM,
        "pipe": pipe,
        "prod": producer,
        "seq": int(seq),
        "names": names,
        "dtypes": dtypes,
        "shapes": shapes,
        "meta": dict(metadata or {}),
    }
    try:
        head = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"item metadata must be msgpack-serialisable (str/int/float/bool/bytes/list/dict): "
            f"{exc}"
        ) from exc
    return [head, *buffers]


def decode_header(frame: bytes | memoryview) -> dict[str, Any]:
    """Parse and validate a header frame; raises :class:`WireError` on anything odd."""
    raw = bytes(frame)
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types on garbage
        raise WireError(f"header is not valid msgpack: {exc!r}") from exc
    if not isinstance(header, dict):
        raise WireError(f"header is a {type(header).__name__}; expected a map")
    if header.get("v") != WIRE_VERSION:
        raise WireError(f"wire version {header.get('v')!r}; expected {WIRE_VERSION}")
    return header


def to_shm_frames(frames: Sequence[bytes | memoryview], segment: Any) -> list[bytes]:
    """Copy an item's buffers into ``segment`` (a :class:`~step_infra.rpc.shm.Segment`) and
    return the single header frame that points at them."""
    header = decode_header(frames[0])
    offsets: list[int] = []
    off = 0
    for buf in frames[1:]:
        view = memoryview(buf).cast("B")
        _parallel_copy(segment.view[off : off + view.nbytes], view)
        offsets.append(off)
        off += (view.nbytes + 63) // 64 * 64  # 64-byte aligned tensors
    header["shm"] = segment.name
    header["offs"] = offsets
    return [msgpack.packb(header, use_bin_type=True)]


def _parallel_copy(dst: memoryview, src: memoryview) -> None:
    """``dst[:] = src`` through torch, whose copy kernel splits large copies over its intra-op
    threads (a plain memoryview assignment is one single-threaded memcpy)."""
    if src.nbytes < (1 << 20):
        dst[:] = src
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only sources are only read
        out = torch.frombuffer(dst, dtype=torch.uint8)
        out.copy_(torch.frombuffer(src, dtype=torch.uint8))


def shm_bytes(frames: Sequence[bytes | memoryview]) -> int:
    """Segment size :func:`to_shm_frames` needs for these frames."""
    return sum((memoryview(b).nbytes + 63) // 64 * 64 for b in frames[1:])


def to_flat_frames(
    frames: Sequence[bytes | memoryview],
) -> tuple[bytes, list[memoryview], list[int], int]:
    """For a bulk channel (lanes, ucx): the header frame announcing one flat payload, the
    buffers, their offsets in the flat payload and its size (see :func:`flat_layout`)."""
    header = decode_header(frames[0])
    buffers = [memoryview(b).cast("B") for b in frames[1:]]
    offsets, total = flat_layout([b.nbytes for b in buffers])
    header["flat"] = total
    header["offs"] = offsets
    header["sizes"] = [b.nbytes for b in buffers]
    return msgpack.packb(header, use_bin_type=True), buffers, offsets, total


def flat_layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Offsets of buffers of ``sizes`` bytes in one flat payload (64-byte aligned, so every
    dtype view is aligned) and the payload's size."""
    offsets: list[int] = []
    off = 0
    for n in sizes:
        offsets.append(off)
        off += (n + 63) // 64 * 64
    return offsets, off


def flat_size(header: Mapping[str, Any]) -> int | None:
    """The flat payload size a header announces (``None``: buffers travel as frames)."""
    total = header.get("flat")
    if total is None:
        return None
    if not isinstance(total, int) or total < 0:
        raise WireError(f"flat payload size {total!r}; expected a non-negative int")
    return total


def decode_item(
    frames: Sequence[bytes | memoryview | Any], shm: Any = None, flat: memoryview | None = None
) -> Item:
    """Rebuild an :class:`Item` from frames; tensors alias the frame buffers (no copy).

    Frames may be ``bytes``, ``memoryview`` or ``zmq.Frame`` (anything exposing ``.buffer``
    or the buffer protocol). Raises :class:`WireError` for malformed or truncated input.
    A header naming a shared-memory segment needs ``shm`` (a
    :class:`~step_infra.rpc.shm.ShmReader`) and carries no buffer frames; a header announcing
    a flat payload (``flat``) needs that payload, received over a bulk channel.
    """
    if not frames:
        raise WireError("empty message")
    header = decode_header(_as_buffer(frames[0]))
    if header.get("k") != KIND_ITEM:
        raise WireError(f"message kind {header.get('k')!r}; expected {KIND_ITEM!r}")
    try:
        pipe = str(header["pipe"])
        producer = str(header["prod"])
        seq = header["seq"]
        names = header["names"]
        dtypes = header["dtypes"]
        shapes = header["shapes"]
        meta = header["meta"]
    except KeyError as exc:
        raise WireError(f"header lacks field {exc}") from exc
    if not isinstance(seq, int) or seq < 0:
        raise WireError(f"sequence number {seq!r}; expected a non-negative int")
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
        raise WireError("names, dtypes and shapes must be lists")
    if not (len(names) == len(dtypes) == len(shapes)) or len(names) > MAX_TENSORS:
        raise WireError(f"inconsistent tensor lists: {len(names)}/{len(dtypes)}/{len(shapes)}")
    seg = header.get("shm")
    offs = header.get("offs")
    total = flat_size(header)
    if total is not None:
        if flat is None or flat.nbytes != total:
            raise WireError(f"item announces a {total}-byte flat payload; none received")
        if not isinstance(offs, list) or len(offs) != len(names) or len(frames) != 1:
            raise WireError(f"bad flat payload fields {offs!r} with {len(frames)} frames")
    elif seg is not None:
        if shm is None:
            raise WireError("item points at shared memory but this link has no shm reader")
        if not isinstance(seg, str) or not isinstance(offs, list) or len(offs) != len(names):
            raise WireError(f"bad shared-memory fields {seg!r} {offs!r}")
        if len(frames) != 1:
            raise WireError(f"{len(frames) - 1} buffer frames in a shared-memory item")
    elif len(frames) != 1 + len(names):
        raise WireError(f"{len(frames) - 1} buffer frames for {len(names)} tensors (truncated?)")
    if not isinstance(meta, dict):
        raise WireError(f"metadata is a {type(meta).__name__}; expected a map")
    tensors: dict[str, torch.Tensor] = {}
    bulk = seg is not None or total is not None
    sources: Sequence[Any] = list(offs or ()) if bulk else frames[1:]
    for name, dname, shape, frame in zip(names, dtypes, shapes, sources, strict=True):
        dtype = _DTYPES.get(dname) if isinstance(dname, str) else None
        if dtype is None:
            raise WireError(f"tensor {name!r}: unknown dtype {dname!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise WireError(f"tensor {name!r}: bad shape {shape!r}")
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if total is not None:
            off = frame
            if not isinstance(off, int) or off < 0 or off + numel * itemsize > total:
                raise WireError(f"tensor {name!r}: offset {off!r} outside the flat payload")
            buf = flat[off : off + numel * itemsize]  # type: ignore[index]
        elif seg is not None:
            try:
                buf = shm.view(seg, int(frame), numel * itemsize)
            except (ValueError, OSError, TypeError) as exc:
                raise WireError(f"tensor {name!r}: shared memory unreadable: {exc}") from exc
        else:
            buf = _as_buffer(frame)
        if buf.nbytes != numel * itemsize:
            raise WireError(
                f"tensor {name!r}: {buf.nbytes} bytes for shape {shape} {dname} "
                f"(expected {numel * itemsize})"
            )
        tensors[str(name)] = _tensor_from_buffer(buf, dtype, shape)
    return Item(pipe=pipe, producer=producer, seq=seq, tensors=tensors, metadata=meta)


def _as_buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", frame)
    try:
        return memoryview(buf).cast("B")
    except TypeError as exc:
        raise WireError(f"frame of type {type(frame).__name__} is not a buffer") from exc


def _tensor_from_buffer(buf: memoryview, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if buf.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # zmq frames are read-only; the tensor aliases them and callers must not write in place
        # (clone() first if they need to). Copying here would double the consumer's cost.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(buf, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)
