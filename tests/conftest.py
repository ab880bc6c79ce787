"""Shared pytest set-up: the `gpu` marker skips, with its reason printed, when no CUDA device."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

# Triton decides at decoration time whether a kernel is compiled or interpreted, so this must
# be set before any test imports step_infra.kernels. It only changes what Triton does when a
# kernel is launched on CPU tensors (the dispatcher still picks the PyTorch reference on CPU
# unless a test forces backend="triton").
os.environ.setdefault("TRITON_INTERPRET", "1")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items or _cuda_available():
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA device: none on this machine (torch.cuda.is_available() is False)"
    )
    for item in gpu_items:
        item.add_marker(skip)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def pid_alive() -> Callable[[int], bool]:
    """Whether a process id is still alive (for "nothing outlived the job" checks)."""
    return _pid_alive


def _write_hardware_profile(path: object, ranks: int, overlap: float = 0.0) -> object:
    """A hardware profile from fixed, made-up measurements (GEMM curve, attention, memory,
    loopback, gloo), as ``step-infra calibrate`` would write it: emulator tests price on it."""
    import json
    from pathlib import Path

    from step_infra.emulator.hwprobe import build_profile

    meas = {
        "when": "2026-01-01T00:00:00Z",
        "host": "test",
        "matmul": [
            {"tokens": 1024, "dim": d, "tflops": 0.05 / (1 + 50 / d + 50 / 1024)}
            for d in (64, 128, 256, 512)
        ],
        "attention": [{"seq": s, "head_dim": 32, "tflops": 0.02} for s in (128, 512)],
        "memory_gb_s": 20.0,
        "memory_gb": 16.0,
        "loopback": {"gb_s": 3.0, "latency_us": 10.0},
        "gloo": {"busbw_gb_s": 1.0, "latency_us": 40.0, "overlap": overlap},
    }
    out = Path(str(path))
    out.write_text(json.dumps(build_profile(meas, name="unit-cpu", ranks_per_node=ranks)))
    return out


@pytest.fixture
def hardware_profile(tmp_path: object) -> Callable[..., object]:
    """``hardware_profile(ranks, overlap=0.0)`` -> the path of a synthetic profile."""
    from pathlib import Path

    def make(ranks: int, *, overlap: float = 0.0) -> object:
        return _write_hardware_profile(
            Path(str(tmp_path)) / f"hw{ranks}-{overlap}.json", ranks, overlap
        )

    return make
