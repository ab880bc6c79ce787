"""StepRPC: named pipes that stream dicts of tensors from encoder servers to DiT trainers.

Importing this package starts nothing and imports nothing heavy: names load their module on
first use (PEP 562), so the CLI can import ``step_infra.rpc.cli`` without torch or zmq.
"""

from __future__ import annotations

from typing import Any

from step_infra.lazy import lazy_attribute

_EXPORTS = {
    "Item": "wire",
    "WireError": "wire",
    "encode_item": "wire",
    "decode_item": "wire",
    "Producer": "producer",
    "ProducerConfig": "producer",
    "Consumer": "consumer",
    "ConsumerConfig": "consumer",
    "PipeDataset": "dataset",
    "PipeStats": "stats",
    "Transport": "transport",
    "make_transport": "transport",
    "Registry": "registry",
    "RegistryClient": "registry",
    "RegistryConfig": "registry",
    "CurveKeys": "security",
    "generate_keys": "security",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _EXPORTS, name)
