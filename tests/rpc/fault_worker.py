"""Child processes for the fault tests: a consumer that logs what it takes, a producer.

Run as ``python fault_worker.py consumer ADDRESS GROUP OUT DELAY_S`` or
``python fault_worker.py producer PORT N START``. Each consumed item is written as
``producer seq crc_sent crc_received`` and flushed before the next item is taken.
"""

from __future__ import annotations

import sys
import time
import zlib

import torch

from step_infra.rpc.consumer import Consumer, ConsumerConfig
from step_infra.rpc.producer import Producer, ProducerConfig


def crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().view(torch.uint8).numpy().tobytes())


def consumer(address: str, group: str, out: str, delay_s: float) -> None:
    cfg = ConsumerConfig(prefetch=2, heartbeat_s=0.1, transport="tcp")
    c = Consumer("faults", [address], group=group, config=cfg)
    with open(out, "w") as f:
        while (item := c.get(timeout_s=4.0)) is not None:
            x = item.tensors["x"]
            f.write(f"{item.producer} {item.seq} {item.metadata['crc']} {crc(x)}\n")
            f.flush()
            time.sleep(delay_s)
    c.close()


def producer(port: int, n: int, start: int) -> None:
    cfg = ProducerConfig(port=port, shm=False, lease_s=1.0)
    with Producer("faults", name="P", config=cfg, start_seq=start) as p:
        p.wait_for_consumers(timeout_s=30)
        for seq in range(start, n):
            x = torch.randn(256, generator=torch.Generator().manual_seed(seq))
            p.send({"x": x}, {"crc": crc(x)})
        p.flush(timeout_s=60)


def stalled_consumer(address: str, stall_s: float, n: int, transport: str) -> None:
    cfg = ConsumerConfig(prefetch=4, heartbeat_s=0.1, transport=transport)
    c = Consumer("faults", [address], group="g", config=cfg)
    print("ready", flush=True)
    time.sleep(stall_s)  # stalled trainer: takes nothing, sends no heartbeat
    for _ in range(n):
        assert c.get(timeout_s=30) is not None
    c.close()


def mem_producer(port: int, limit_mib: int, item_mib: int, n: int, shm: bool) -> None:
    cfg = ProducerConfig(port=port, shm=shm, lease_s=30.0, max_inflight_bytes=limit_mib << 20)
    with Producer("faults", name="P", config=cfg) as p:
        print(p.address, flush=True)
        p.wait_for_consumers(timeout_s=30)
        for _ in range(n):
            p.send({"x": torch.randn(item_mib << 18)})  # fresh 'item_mib' MiB each time
        p.flush(timeout_s=60)


if __name__ == "__main__":
    if sys.argv[1] == "stalled":
        stalled_consumer(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    elif sys.argv[1] == "memprod":
        mem_producer(*(int(a) for a in sys.argv[2:6]), shm=sys.argv[6] == "shm")
    elif sys.argv[1] == "consumer":
        consumer(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]))
    else:
        producer(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
