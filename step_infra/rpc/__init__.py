"""StepRPC: named pipes that stream dicts of tensors from encoder servers to DiT trainers.

Importing this package starts nothing and imports nothing heavy: names load their module on
first use (PEP 562), so the CLI can import ``step_infra.rpc.cli`` without torch or zmq.
"""

from __future__ import annotations

import importlib
from typing import Any

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
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'step_infra.rpc' has no attribute {name!r}")
    return getattr(importlib.import_module(f"step_infra.rpc.{module}"), name)
