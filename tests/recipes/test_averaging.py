"""Checkpoint averaging: the uniform mean, and peak memory near one model rather than N."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from step_infra.recipes.averaging import average_checkpoints


def test_average_is_the_mean(tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        p = tmp_path / f"c{i}.pt"
        torch.save(
            {"w": torch.full((2, 2), float(i)), "b": torch.tensor([i], dtype=torch.float16)}, p
        )
        paths.append(p)
    avg = average_checkpoints(paths, tmp_path / "avg.pt")
    torch.testing.assert_close(avg["w"], torch.full((2, 2), 1.0))
    assert avg["b"].dtype == torch.float16
    assert torch.load(tmp_path / "avg.pt")["w"].sum() == 4.0
    torch.save({"w": torch.zeros(3), "b": torch.zeros(1, dtype=torch.float16)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="shape"):
        average_checkpoints([paths[0], tmp_path / "bad.pt"])
    with pytest.raises(ValueError, match="at least one"):
        average_checkpoints([])


def test_peak_memory_stays_near_one_model(tmp_path: Path) -> None:
    n, mib = 8, 32
    for i in range(n):
        torch.save(
            {f"p{j}": torch.full((mib * 1024 * 256 // 4,), float(i)) for j in range(4)},
            tmp_path / f"{i}.pt",
        )
    code = textwrap.dedent(f"""
        import resource, torch, glob
        from step_infra.recipes.averaging import average_checkpoints
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        avg = average_checkpoints(sorted(glob.glob({str(tmp_path)!r} + "/*.pt")))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert abs(float(avg["p0"][0]) - {(n - 1) / 2}) < 1e-6
        print((peak - base) / 1024)
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=100, check=True
    )
    grew_mib = float(out.stdout.strip().splitlines()[-1])
    # One model is 32 MiB; loading all 8 would need >= 256 MiB. Accumulator + one mapped file ~ 64.
    assert grew_mib < 3 * mib, grew_mib
