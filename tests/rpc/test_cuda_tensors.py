"""CUDA tensors through StepRPC: the header's ``devs``, the producer's pinned staging pool and
the consumer's device rule.

Everything that does not need a GPU runs here for real (the schema, old headers, hostile
values, the device rule for every combination, the staging pool's reuse and accounting, real
pipes over tcp and shm with CPU tensors, the benchmark's dry run). The tests marked ``gpu``
send real CUDA tensors and are skipped, with the reason printed, where CUDA is not available
(tests/conftest.py). Nothing here mocks CUDA.
"""

from __future__ import annotations

import itertools
import time

import msgpack
import msgspec
import pytest
import torch

from step_infra.rpc.bulk_producer import ItemMemory
from step_infra.rpc.consumer import Consumer, ConsumerConfig, target_device
from step_infra.rpc.messages import (
    MAX_TENSORS,
    WIRE_VERSION,
    ItemHeader,
    decode_header,
    decode_to_consumer,
    encode,
)
from step_infra.rpc.producer import Producer, ProducerConfig
from step_infra.rpc.staging import StagingPool
from step_infra.rpc.wire import WireError, check_flat, decode_item, encode_item

pytestmark = pytest.mark.timeout(60)

CUDA = torch.cuda.is_available()


def _header(**fields: object) -> ItemHeader:
    base: dict[str, object] = {
        "v": WIRE_VERSION,
        "pipe": "p",
        "prod": "a",
        "seq": 0,
        "names": ["x", "y"],
        "dtypes": ["float32", "int64"],
        "shapes": [[2], [3]],
    }
    base.update(fields)
    return ItemHeader(**base)  # type: ignore[arg-type]


def _raw_header(**fields: object) -> bytes:
    """A header as any peer could pack it (no schema on the way out)."""
    base: dict[str, object] = {
        "k": "item",
        "v": WIRE_VERSION,
        "pipe": "p",
        "prod": "a",
        "seq": 0,
        "names": ["x"],
        "dtypes": ["float32"],
        "shapes": [[2]],
    }
    base.update(fields)
    return msgpack.packb(base)


# ------------------------------------------------------------------------------ the header
def test_devs_round_trip_through_the_schema() -> None:
    header = _header(devs=["cpu", "cuda"])
    for decode in (decode_header, decode_to_consumer):
        got = decode(encode(header))
        assert isinstance(got, ItemHeader), got
        assert got.devs == ["cpu", "cuda"]
        assert got == header


def test_cpu_items_carry_no_devs_and_old_headers_decode() -> None:
    frames = encode_item(pipe="p", producer="a", seq=3, tensors={"x": torch.ones(2)})
    assert "devs" not in msgpack.unpackb(frames[0])  # what an older peer sends and reads
    old = _raw_header()
    header = decode_header(old)
    assert isinstance(header, ItemHeader) and header.devs is None
    item = decode_item([old, torch.arange(2, dtype=torch.float32).numpy().tobytes()])
    assert item.devices == {}
    assert torch.equal(item.tensors["x"], torch.arange(2, dtype=torch.float32))


def test_marked_header_gives_the_item_its_devices() -> None:
    frames = encode_item(
        pipe="p", producer="a", seq=0, tensors={"x": torch.ones(2), "y": torch.zeros(3)}
    )
    header = decode_header(frames[0])
    assert isinstance(header, ItemHeader)
    marked = encode(msgspec.structs.replace(header, devs=["cuda", "cpu"]))
    item = decode_item([marked, *frames[1:]])
    assert item.devices == {"x": "cuda", "y": "cpu"}
    assert item.tensors["x"].device.type == "cpu"  # the wire only says where it came from


@pytest.mark.parametrize(
    "devs",
    [
        ["cuda"] * (MAX_TENSORS + 1),  # longer than any item may be
        ["tpu"],  # not a device kind the wire knows
        ["CUDA"],
        [""],
        [1],
        "cuda",  # not a list
        [["cuda"]],
    ],
    ids=["too-long", "tpu", "upper", "empty", "int", "string", "nested"],
)
def test_hostile_devs_are_refused_by_the_schema(devs: object) -> None:
    got = decode_header(_raw_header(devs=devs))
    assert isinstance(got, str) and "devs" in got, got
    assert isinstance(decode_to_consumer(_raw_header(devs=devs)), str)


def test_devs_not_matching_the_tensors_are_refused() -> None:
    raw = _raw_header(devs=["cuda", "cuda"])  # two devices, one tensor
    header = decode_header(raw)
    assert isinstance(header, ItemHeader)  # the schema cannot see it; the item check does
    with pytest.raises(WireError, match="2 devices for 1 tensors"):
        decode_item([raw, bytes(8)])
    flat = msgspec.structs.replace(header, flat=64, offs=[0], sizes=[8])
    with pytest.raises(WireError, match="2 devices for 1 tensors"):
        check_flat(flat, 1 << 20)


def test_encode_item_takes_staged_bytes_and_checks_their_size() -> None:
    t = torch.arange(4, dtype=torch.int32)
    staged = memoryview(bytearray(torch.full((4,), 7, dtype=torch.int32).numpy().tobytes()))
    item = decode_item(
        encode_item(pipe="p", producer="a", seq=0, tensors={"x": t}, buffers={"x": staged})
    )
    assert torch.equal(item.tensors["x"], torch.full((4,), 7, dtype=torch.int32))
    with pytest.raises(ValueError, match="staged buffer of 'x' has 8 bytes"):
        encode_item(pipe="p", producer="a", seq=0, tensors={"x": t}, buffers={"x": staged[:8]})


# ------------------------------------------------------------------------------ device rule
def _expected(marked: str, config: str, cuda: bool, current: int) -> torch.device | None:
    """The rule written out case by case (``None``: refused)."""
    if config == "cpu":
        return torch.device("cpu")
    if config == "auto":
        return torch.device("cuda", current) if marked == "cuda" and cuda else torch.device("cpu")
    if not cuda:
        return None
    return torch.device("cuda", current if config == "cuda" else int(config.split(":")[1]))


@pytest.mark.parametrize(
    ("marked", "config", "cuda", "current"),
    list(
        itertools.product(["cpu", "cuda"], ["auto", "cpu", "cuda", "cuda:1"], [True, False], [0, 3])
    ),
)
def test_target_device_every_case(marked: str, config: str, cuda: bool, current: int) -> None:
    want = _expected(marked, config, cuda, current)
    if want is None:
        with pytest.raises(ValueError, match="CUDA is not available"):
            target_device(marked, config, cuda, current_index=current)
    else:
        assert target_device(marked, config, cuda, current_index=current) == want


@pytest.mark.parametrize("bad", ["tpu", "cuda:x", "mps", "", "meta", "npu"])
def test_bad_device_strings_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=repr(bad)):
        ConsumerConfig(device=bad)
    with pytest.raises(ValueError):
        target_device("cuda", bad, True)


def test_explicit_cuda_device_without_cuda_is_refused_at_start() -> None:
    if CUDA:
        pytest.skip("this machine has CUDA: an explicit device is valid here")
    ConsumerConfig(device="cuda:1")  # the config alone does not ask CUDA
    with pytest.raises(ValueError, match="CUDA is not available"):
        Consumer("p", ["tcp://127.0.0.1:1"], config=ConsumerConfig(device="cuda"))


# ------------------------------------------------------------------------------ staging pool
def test_staging_pool_reuses_a_buffer_only_when_nothing_refers_to_it() -> None:
    pool = StagingPool(keep=2, pin=False)
    arr, _ = pool.take(1000)
    view = memoryview(arr)[10:20]  # as an item's frame holds it
    del arr, _
    assert pool.idle_bytes == 0
    second, _ = pool.take(1000)  # the first one is in use: a new buffer
    assert pool.allocations == 2
    del second, _
    assert pool.idle_bytes == 1000
    again, _ = pool.take(900)  # fits the idle one
    assert pool.allocations == 2
    del again, _
    del view  # the frame is gone: the first buffer is free too
    assert pool.idle_bytes == 2000
    pool.take(10 << 20)  # far larger than both: a new one, kept in place of an idle one
    assert pool.allocations == 3


def test_staging_pool_leaves_cpu_tensors_alone() -> None:
    pool = StagingPool(pin=False)
    assert pool.stage({"x": torch.ones(3), "y": torch.arange(4)}) == {}
    assert pool.allocations == 0


def test_idle_staging_buffers_count_as_held_memory_and_are_trimmed() -> None:
    memory = ItemMemory(None, StagingPool(pin=False))
    arr, _ = memory.staging.take(1 << 20)
    held = memoryview(arr)
    del arr, _
    assert memory.held_bytes == 0  # in use: its item counts those bytes
    del held
    assert memory.held_bytes == 1 << 20  # kept for reuse, as an idle shm segment
    assert memory.trim()
    assert memory.held_bytes == 0 and not memory.trim()


# ------------------------------------------------------------------------------ real pipes
def _payload() -> dict[str, torch.Tensor]:
    big = torch.randn(1 << 19).to(torch.bfloat16)  # 1 MiB: over the lanes on tcp
    return {
        "big": big,
        "ids": torch.arange(7, dtype=torch.int64),
        "mask": torch.rand(5, 3) > 0.5,
        "t": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
        "empty": torch.empty(0, 3),
    }


@pytest.mark.integration
@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_cpu_tensors_arrive_identical_with_cpu_and_auto(transport: str) -> None:
    sent = [_payload() for _ in range(3)]
    got: dict[str, list[dict[str, torch.Tensor]]] = {}
    with Producer("p", config=ProducerConfig()) as prod:
        for device in ("cpu", "auto"):
            cfg = ConsumerConfig(transport=transport, device=device)
            c = Consumer("p", [prod.address], group=device, config=cfg)
            assert c.transports == [transport]
            prod.wait_for_consumers(groups=1)
            for item in sent:
                prod.send(item)
            out = got[device] = []
            for _ in sent:
                it = c.get(timeout_s=10)
                assert it is not None and it.devices == {}
                out.append({k: v.clone() for k, v in it.tensors.items()})
            c.close()
            deadline = time.monotonic() + 10
            while (prod.unacked or prod.groups()) and time.monotonic() < deadline:
                prod.poll(20)
        assert prod.staging.allocations == 0  # CPU tensors are never staged
    for device, items in got.items():
        for want, have in zip(sent, items, strict=True):
            assert set(have) == set(want)
            for k, t in want.items():
                assert have[k].device.type == "cpu", (device, k)
                assert have[k].dtype == t.dtype and have[k].shape == t.shape
                assert torch.equal(have[k], t), (device, k)


@pytest.mark.integration
@pytest.mark.timeout(30)
@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_measure_cuda_pipe_dry_run(transport: str) -> None:
    from step_infra.rpc.cuda_bench import measure_cuda_pipe

    start = time.monotonic()
    out = measure_cuda_pipe(1 << 20, 16, transport, dry_run=True, timeout_s=20)
    assert time.monotonic() - start < 15
    assert out["device"] == "cpu" and out["dry_run"] is True
    assert out["transport"] == transport
    assert out["nbytes"] == 64 << 10 and out["items"] == 8
    assert out["consumer_devices"] == ["cpu"] and out["bit_identical"] is True
    assert out["pipe_gib_per_s"] > 0 and out["staged_copy_gib_per_s"] > 0
    assert out["pipe_vs_staged_copy"] == pytest.approx(
        out["pipe_gib_per_s"] / out["staged_copy_gib_per_s"]
    )


def test_measure_cuda_pipe_refuses_without_cuda_unless_dry_run() -> None:
    from step_infra.rpc.cuda_bench import measure_cuda_pipe

    with pytest.raises(ValueError, match="transport 'ucx'"):
        measure_cuda_pipe(1024, 4, "ucx", dry_run=True)
    with pytest.raises(ValueError, match="items 1"):
        measure_cuda_pipe(1024, 1, dry_run=True)
    if not CUDA:
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            measure_cuda_pipe(1024, 4)


# ------------------------------------------------------------------------------ on a GPU
def _cuda_payload() -> dict[str, torch.Tensor]:
    dev = torch.device("cuda", torch.cuda.current_device())
    return {
        "big": torch.randn(1 << 20, device=dev).to(torch.bfloat16),  # 2 MiB: lanes on tcp
        "ids": torch.arange(1000, dtype=torch.int64, device=dev),
        "mask": torch.rand(33, 7, device=dev) > 0.5,
        "t": torch.arange(12, dtype=torch.float32, device=dev).reshape(3, 4).t(),
        "empty": torch.empty(0, 3, device=dev),
        "host": torch.arange(5, dtype=torch.int16),  # a CPU tensor in the same item
    }


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.cpu().contiguous(), b.cpu().contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1), b.view(-1))


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.parametrize("transport", ["tcp", "shm"])
@pytest.mark.parametrize("device", ["auto", "cpu", "cuda:0"])
def test_cuda_tensors_arrive_where_the_rule_says(transport: str, device: str) -> None:
    sent = [_cuda_payload() for _ in range(3)]
    current = torch.cuda.current_device()
    with Producer("p") as prod:
        c = Consumer(
            "p",
            [prod.address],
            group="g",
            config=ConsumerConfig(transport=transport, device=device),
        )
        assert c.transports == [transport]
        prod.wait_for_consumers()
        for item in sent:
            prod.send(item)
        for want in sent:
            got = c.get(timeout_s=20)
            assert got is not None
            assert got.devices == {k: "cuda" if v.is_cuda else "cpu" for k, v in want.items()}
            for k, t in want.items():
                where = target_device(
                    "cuda" if t.is_cuda else "cpu", device, True, current_index=current
                )
                assert got.tensors[k].device == where, (k, got.tensors[k].device, where)
                assert _same_bits(got.tensors[k], t), k
        c.close()
        assert prod.staging.pinned


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_staging_buffers_are_reused_across_items(transport: str) -> None:
    x = torch.randn(1 << 20, device="cuda")  # 4 MiB
    with Producer("p") as prod:
        cfg = ConsumerConfig(transport=transport, ack="manual")
        c = Consumer("p", [prod.address], group="g", config=cfg)
        prod.wait_for_consumers()
        for i in range(10):
            prod.send({"x": x * i})
            got = c.get(timeout_s=20)
            assert got is not None and got.tensors["x"].is_cuda
            assert torch.equal(got.tensors["x"], x * i)
            c.acknowledge([got])
            deadline = time.monotonic() + 10
            while prod.unacked and time.monotonic() < deadline:
                prod.poll(10)
            assert prod.unacked == 0
        # one buffer for all ten items (two if zmq had not yet let go of the previous frame)
        assert 1 <= prod.staging.allocations <= 2, prod.staging.allocations
        c.close()


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_measure_cuda_pipe_on_a_gpu(transport: str) -> None:
    from step_infra.rpc.cuda_bench import measure_cuda_pipe

    out = measure_cuda_pipe(16 << 20, 8, transport, timeout_s=60)
    assert out["device"] == "cuda" and out["dry_run"] is False
    assert out["consumer_devices"] == [f"cuda:{torch.cuda.current_device()}"]
    assert out["bit_identical"] is True
    assert out["pipe_gib_per_s"] > 0 and out["staged_copy_gib_per_s"] > 0
