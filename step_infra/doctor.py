"""What this machine offers step-infra: versions of the stack and the devices it can use.

The first thing a trainer or an SRE asks on a new host is "what will run here?" - which
torch, whether CUDA and Triton are usable, whether the optional RDMA and Transformer-Engine
extras load. Each probe is isolated so one broken import cannot hide the others.
"""

from __future__ import annotations

import importlib
import os
import platform
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Probe:
    """One line of the report: a component, whether it is usable, and the detail."""

    name: str
    ok: bool
    detail: str
    required: bool


def _module_version(module: str) -> tuple[bool, str]:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # any import failure is a finding, not a crash
        return False, f"cannot import: {type(exc).__name__}: {exc}"[:160]
    return True, str(getattr(mod, "__version__", "installed"))


def probe_environment() -> list[Probe]:
    """Probe the stack; never raises. Required components come first."""
    probes = [Probe(name="python", ok=True, detail=platform.python_version(), required=True)]
    for module, required in [
        ("torch", True),
        ("megatron.core", True),
        ("triton", True),
        ("zmq", True),
        ("grpc", True),
        ("opentelemetry.sdk", True),
        ("pandas", True),
        ("pyarrow", True),
        ("transformer_engine", False),
        ("ucxx", False),
    ]:
        ok, detail = _module_version(module)
        if module == "transformer_engine" and not ok:
            detail += (
                "; megatron-core then uses its PyTorch layers and optimizers (the CPU path; its "
                "'Transformer Engine and Apex are not installed' warnings are silenced). On "
                "GPUs, the package's gpu extra installs it"
            )
        probes.append(Probe(name=module, ok=ok, detail=detail, required=required))
    probes.append(_probe_cuda())
    probes.append(
        Probe(
            name="cpu cores",
            ok=True,
            detail=str(len(os.sched_getaffinity(0))),
            required=True,
        )
    )
    return probes


def _probe_cuda() -> Probe:
    try:
        import torch
    except Exception as exc:
        return Probe(name="cuda", ok=False, detail=f"torch missing: {exc}", required=False)
    if not torch.cuda.is_available():
        return Probe(
            name="cuda", ok=False, detail="no CUDA device (CPU build or no GPU)", required=False
        )
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return Probe(name="cuda", ok=True, detail=names, required=False)
