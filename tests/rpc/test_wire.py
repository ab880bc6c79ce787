"""Wire format: round trips for every dtype, non-contiguous input, and garbage rejected."""

from __future__ import annotations

import random

import msgpack
import pytest
import torch

from step_infra.rpc.wire import WireError, decode_item, encode_item, supported_dtypes


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(0, 100, shape).to(dtype)


@pytest.mark.parametrize("dtype", supported_dtypes(), ids=str)
def test_round_trip_every_dtype(dtype: torch.dtype) -> None:
    t = _sample(dtype, (3, 5))
    frames = encode_item(pipe="p", producer="a", seq=7, tensors={"x": t}, metadata={"id": 1})
    item = decode_item(frames)
    assert item.pipe == "p" and item.producer == "a" and item.seq == 7
    assert item.metadata == {"id": 1}
    got = item.tensors["x"]
    assert got.dtype == dtype and got.shape == t.shape
    assert torch.equal(got.view(torch.uint8), t.view(torch.uint8))


def test_non_contiguous_scalar_and_empty() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"t": base.t(), "s": base[:, ::2], "z": torch.tensor(3.5), "e": torch.empty(0, 4)}
    item = decode_item(encode_item(pipe="p", producer="a", seq=0, tensors=tensors))
    for name, t in tensors.items():
        assert torch.equal(item.tensors[name], t), name


def test_bf16_bits_preserved() -> None:
    t = torch.randn(1000).to(torch.bfloat16)
    item = decode_item(encode_item(pipe="p", producer="a", seq=1, tensors={"x": t}))
    assert torch.equal(item.tensors["x"].view(torch.int16), t.view(torch.int16))


def test_buffers_are_not_copied_on_encode() -> None:
    t = torch.zeros(16, dtype=torch.float32)
    frames = encode_item(pipe="p", producer="a", seq=0, tensors={"x": t})
    t[0] = 42.0
    assert decode_item(frames).tensors["x"][0].item() == 42.0


def test_truncated_and_inconsistent_rejected() -> None:
    frames = encode_item(pipe="p", producer="a", seq=0, tensors={"x": torch.ones(8)})
    with pytest.raises(WireError, match="truncated"):
        decode_item(frames[:1])
    with pytest.raises(WireError, match="bytes for shape"):
        decode_item([frames[0], bytes(frames[1])[:-1]])
    with pytest.raises(WireError):
        decode_item([])
    bad = msgpack.packb(
        {
            "v": 1,
            "k": "item",
            "pipe": "p",
            "prod": "a",
            "seq": -1,
            "names": [],
            "dtypes": [],
            "shapes": [],
            "meta": {},
        }
    )
    with pytest.raises(WireError, match=r"\$\.seq"):
        decode_item([bad])
    bad = msgpack.packb(
        {
            "v": 1,
            "k": "item",
            "pipe": "p",
            "prod": "a",
            "seq": 0,
            "names": ["x"],
            "dtypes": ["object"],
            "shapes": [[1]],
            "meta": {},
        }
    )
    with pytest.raises(WireError, match="dtype"):
        decode_item([bad, b"\0"])


def test_no_pickle_metadata() -> None:
    with pytest.raises(ValueError, match="msgpack"):
        encode_item(pipe="p", producer="a", seq=0, tensors={}, metadata={"o": object()})


def test_fuzzed_garbage_only_raises_wire_error() -> None:
    rng = random.Random(0)
    good = encode_item(pipe="p", producer="a", seq=3, tensors={"x": torch.ones(4, 4)})
    head = bytes(good[0])
    for _ in range(2000):
        mode = rng.randrange(3)
        if mode == 0:
            frames: list[bytes] = [rng.randbytes(rng.randrange(0, 64))]
        elif mode == 1:
            h = bytearray(head)
            for _ in range(rng.randrange(1, 4)):
                h[rng.randrange(len(h))] = rng.randrange(256)
            frames = [bytes(h), bytes(good[1])]
        else:
            frames = [head[: rng.randrange(len(head))], bytes(good[1])]
        try:
            item = decode_item(frames)
        except WireError:
            continue
        # a mutation that still decodes must still be self-consistent
        assert all(t.numel() * t.element_size() >= 0 for t in item.tensors.values())
