"""StepRPC wire format: one msgpack header frame, then one raw buffer frame per tensor.

Why this shape: the header is small and self-describing (pipe, producer, sequence number,
tensor names, dtypes, shapes, metadata), and the tensor bytes travel as separate frames so
that pyzmq can send them with ``copy=False`` and the consumer can wrap them with
``torch.frombuffer`` without another copy. Nothing on the wire is pickled: the header is
checked against :class:`~step_infra.rpc.messages.ItemHeader` and every size against the shapes
it announces, so a hostile or corrupt peer can at worst make :func:`decode_item` raise
:class:`WireError`, which callers count and drop.

CUDA tensors travel as host bytes too; the header's ``devs`` list says which tensors were on a
CUDA device (omitted when none was, so CPU items are byte-for-byte what older peers send), and
:attr:`Item.devices` hands that to the consumer, which decides where they go. The producer
copies them to host through reused pinned buffers (``staging.py``) and passes those bytes in as
``buffers``; without them :func:`tensor_buffer` falls back to ``tensor.cpu()``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch

from step_infra.rpc import messages
from step_infra.rpc.messages import MAX_TENSORS, WIRE_VERSION, DeviceKind, ItemHeader, encode

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
_ITEMSIZE: dict[torch.dtype, int] = {d: torch.empty((), dtype=d).element_size() for d in _NAMES}
del _name

__all__ = ["MAX_TENSORS", "WIRE_VERSION", "Item", "WireError", "decode_item", "encode_item"]


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
    # where each tensor was on its producer, "cpu" or "cuda" (empty: all on the CPU, as an
    # older producer's items are); the consumer moves "cuda" ones per ConsumerConfig.device
    devices: dict[str, str] = field(default_factory=dict)

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


def device_kind(tensor: torch.Tensor) -> DeviceKind:
    """The wire's name for where ``tensor`` lives: ``"cuda"`` for a CUDA tensor, else
    ``"cpu"`` (other accelerators' tensors are sent, and arrive, as CPU tensors)."""
    return "cuda" if tensor.is_cuda else "cpu"


def _dtype_name(dtype: torch.dtype) -> str:
    name = _NAMES.get(dtype)
    if name is None:
        raise ValueError(
            f"tensor dtype {dtype} is not supported on the wire; expected one of {sorted(_DTYPES)}"
        )
    return name


def tensor_buffer(tensor: torch.Tensor) -> memoryview:
    """A byte view of ``tensor`` (made contiguous, moved to CPU) without copying when possible."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    _dtype_name(t.dtype)  # raises for a dtype the wire does not carry
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
    buffers: Mapping[str, memoryview] | None = None,
) -> list[bytes | memoryview]:
    """Frames for one item: ``[header, buffer_0, buffer_1, ...]``; buffers are not copied.

    ``buffers``: host bytes already made for some tensors, by name (the producer's staged
    copies of its CUDA tensors); the others' bytes come from :func:`tensor_buffer`."""
    names: list[str] = []
    dtypes: list[str] = []
    shapes: list[list[int]] = []
    devs: list[DeviceKind] = []
    frames: list[bytes | memoryview] = []
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"item field {name!r} is a {type(tensor).__name__}; expected a tensor")
        staged = buffers.get(str(name)) if buffers else None
        if staged is not None and staged.nbytes != tensor.numel() * tensor.element_size():
            raise ValueError(
                f"staged buffer of {name!r} has {staged.nbytes} bytes; its tensor has "
                f"{tensor.numel() * tensor.element_size()}"
            )
        buf = staged if staged is not None else tensor_buffer(tensor)
        names.append(str(name))
        dtypes.append(_dtype_name(tensor.dtype))
        shapes.append(list(tensor.shape))
        devs.append(device_kind(tensor))
        frames.append(buf)
    header = ItemHeader(
        v=WIRE_VERSION,
        pipe=pipe,
        prod=producer,
        seq=int(seq),
        names=names,
        dtypes=dtypes,
        shapes=shapes,
        meta=dict(metadata or {}),
        devs=devs if "cuda" in devs else None,  # all on the CPU: the header older peers know
    )
    try:
        head = encode(header)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(
            f"item metadata must be msgpack-serialisable (str/int/float/bool/bytes/list/dict): "
            f"{exc}"
        ) from exc
    return [head, *frames]


def decode_header(frame: bytes | memoryview) -> ItemHeader:
    """Parse and validate a header frame against :class:`~step_infra.rpc.messages.ItemHeader`;
    raises :class:`WireError` with the reason on anything odd."""
    header = messages.decode_header(frame)
    if isinstance(header, str):
        raise WireError(header)
    return header


def _sizes(frames: Sequence[bytes | memoryview]) -> list[int]:
    return [memoryview(b).nbytes for b in frames[1:]]


def to_shm_frames(frames: Sequence[bytes | memoryview], segment: Any) -> list[bytes]:
    """Copy an item's buffers into ``segment`` (a :class:`~step_infra.rpc.shm.Segment`), laid
    out as :func:`flat_layout` lays them, and return the single header frame that points at
    them."""
    header = decode_header(frames[0])
    offsets, _ = flat_layout(_sizes(frames))
    for off, buf in zip(offsets, frames[1:], strict=True):
        view = memoryview(buf).cast("B")
        _parallel_copy(segment.view[off : off + view.nbytes], view)
    return [encode(msgspec.structs.replace(header, shm=segment.name, offs=offsets))]


def frames_in_segment(frames: Sequence[bytes | memoryview], segment: Any) -> list[Any]:
    """``frames`` with every buffer replaced by its copy in ``segment`` (as
    :func:`to_shm_frames` laid them out), so the producer can let the caller's tensors go and
    hold each in-flight item's bytes once."""
    sizes = _sizes(frames)
    offsets, _ = flat_layout(sizes)
    return [frames[0], *(segment.view[o : o + n] for o, n in zip(offsets, sizes, strict=True))]


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
    return flat_layout(_sizes(frames))[1]


def to_flat_frames(
    frames: Sequence[bytes | memoryview],
) -> tuple[bytes, list[memoryview], list[int], int]:
    """For a bulk channel (lanes, ucx): the header frame announcing one flat payload, the
    buffers, their offsets in the flat payload and its size (see :func:`flat_layout`)."""
    header = decode_header(frames[0])
    buffers = [memoryview(b).cast("B") for b in frames[1:]]
    sizes = [b.nbytes for b in buffers]
    offsets, total = flat_layout(sizes)
    head = encode(msgspec.structs.replace(header, flat=total, offs=offsets, sizes=sizes))
    return head, buffers, offsets, total


def flat_layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Offsets of buffers of ``sizes`` bytes in one flat payload (64-byte aligned, so every
    dtype view is aligned) and the payload's size."""
    offsets: list[int] = []
    off = 0
    for n in sizes:
        offsets.append(off)
        off += (n + 63) // 64 * 64
    return offsets, off


def item_bytes(header: ItemHeader) -> int:
    """Payload bytes the header's tensors need, from their shapes and dtypes; raises
    :class:`WireError` when the lists disagree or a dtype is unknown."""
    if not len(header.names) == len(header.dtypes) == len(header.shapes):
        raise WireError(
            f"inconsistent tensor lists: {len(header.names)} names, {len(header.dtypes)} "
            f"dtypes, {len(header.shapes)} shapes"
        )
    if header.devs is not None and len(header.devs) != len(header.names):
        raise WireError(f"{len(header.devs)} devices for {len(header.names)} tensors")
    total = 0
    for name, dname, shape in zip(header.names, header.dtypes, header.shapes, strict=True):
        dtype = _DTYPES.get(dname)
        if dtype is None:
            raise WireError(f"tensor {name!r}: unknown dtype {dname!r}")
        total += math.prod(shape) * _ITEMSIZE[dtype]
    return total


def check_flat(header: ItemHeader, max_bytes: int) -> int | None:
    """The flat payload a header announces (``None``: buffers travel as frames), checked
    against what its shapes need and ``max_bytes`` before a receiver allocates anything."""
    if header.flat is None:
        return None
    need = item_bytes(header)
    if header.flat > max_bytes:
        raise WireError(
            f"item {header.seq} announces a {header.flat}-byte payload; this consumer accepts "
            f"at most {max_bytes} (ConsumerConfig.max_item_bytes)"
        )
    if header.flat < need or header.flat > need + 64 * len(header.names):
        raise WireError(
            f"item {header.seq} announces a {header.flat}-byte payload for {need} bytes of tensors"
        )
    return header.flat


def decode_item(
    frames: Sequence[bytes | memoryview | Any],
    shm: Any = None,
    flat: memoryview | None = None,
    *,
    header: ItemHeader | None = None,
    max_bytes: int | None = None,
) -> Item:
    """Rebuild an :class:`Item` from frames; tensors alias the frame buffers (no copy).

    Frames may be ``bytes``, ``memoryview`` or ``zmq.Frame`` (anything exposing ``.buffer``
    or the buffer protocol). Raises :class:`WireError` for malformed or truncated input.
    A header naming a shared-memory segment needs ``shm`` (a
    :class:`~step_infra.rpc.shm.ShmReader`) and carries no buffer frames; a header announcing
    a flat payload (``flat``) needs that payload, received over a bulk channel. ``header``: the
    first frame already decoded; ``max_bytes``: the most payload an item may announce.
    """
    if not frames:
        raise WireError("empty message")
    if header is None:
        header = decode_header(_as_buffer(frames[0]))
    names, dtypes, shapes, offs = header.names, header.dtypes, header.shapes, header.offs
    need = item_bytes(header)
    if max_bytes is not None and need > max_bytes:
        raise WireError(f"item {header.seq} needs {need} bytes; at most {max_bytes} accepted")
    seg = header.shm
    total = header.flat
    if total is not None:
        if flat is None or flat.nbytes != total:
            raise WireError(f"item announces a {total}-byte flat payload; none received")
        if offs is None or len(offs) != len(names) or len(frames) != 1:
            raise WireError(f"bad flat payload fields {offs!r} with {len(frames)} frames")
    elif seg is not None:
        if shm is None:
            raise WireError("item points at shared memory but this link has no shm reader")
        if offs is None or len(offs) != len(names):
            raise WireError(f"bad shared-memory fields {seg!r} {offs!r}")
        if len(frames) != 1:
            raise WireError(f"{len(frames) - 1} buffer frames in a shared-memory item")
    elif len(frames) != 1 + len(names):
        raise WireError(f"{len(frames) - 1} buffer frames for {len(names)} tensors (truncated?)")
    tensors: dict[str, torch.Tensor] = {}
    bulk = seg is not None or total is not None
    sources: Sequence[Any] = list(offs or ()) if bulk else frames[1:]
    for name, dname, shape, frame in zip(names, dtypes, shapes, sources, strict=True):
        dtype = _DTYPES[dname]
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if total is not None:
            off = frame
            if off + nbytes > total:
                raise WireError(f"tensor {name!r}: offset {off!r} outside the flat payload")
            buf = flat[off : off + nbytes]  # type: ignore[index]
        elif seg is not None:
            try:
                buf = shm.view(seg, int(frame), nbytes)
            except (ValueError, OSError, TypeError) as exc:
                raise WireError(f"tensor {name!r}: shared memory unreadable: {exc}") from exc
        else:
            buf = _as_buffer(frame)
        if buf.nbytes != nbytes:
            raise WireError(
                f"tensor {name!r}: {buf.nbytes} bytes for shape {shape} {dname} (expected {nbytes})"
            )
        try:
            tensors[str(name)] = _tensor_from_buffer(buf, dtype, shape)
        except (RuntimeError, ValueError) as exc:  # e.g. a zero-size shape torch cannot index
            raise WireError(f"tensor {name!r}: shape {shape} unusable: {exc}") from exc
    return Item(
        pipe=header.pipe,
        producer=header.prod,
        seq=header.seq,
        tensors=tensors,
        metadata=header.meta,
        devices=dict(zip(map(str, names), header.devs, strict=True)) if header.devs else {},
    )


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
