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
