"""TP, SP, CP (Ulysses and ring), DP and TP x DP give the one-rank outputs and gradients.

Real ``torchrun`` processes on gloo. The tolerance (1e-5 relative to each tensor's largest
reference value) is explained in ``step_infra.models.parallel_check``; measured errors are
~1e-7 (outputs) and ~5e-7 (gradients).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(nproc: int, *args: str) -> tuple[int, list[dict[str, object]], str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
        "-m", "step_infra.models.parallel_check", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=100, env=env)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, rows, proc.stderr[-3000:]


def test_two_rank_layouts_match_one_rank() -> None:
    rc, rows, err = _torchrun(2, "tp2", "tp2sp", "cp2u", "cp2r", "dp2")
    assert rc == 0, err
    assert [r["layout"] for r in rows] == ["tp2", "tp2sp", "cp2u", "cp2r", "dp2"]
    for r in rows:
        assert r["ok"], r
        assert float(r["max_rel_err_output"]) < 1e-5 and float(r["max_rel_err_grad"]) < 1e-5  # type: ignore[arg-type]


def test_four_rank_layouts_and_strategy_file(tmp_path: Path) -> None:
    strategy = tmp_path / "strategy.toml"
    strategy.write_text(
        '[model]\npreset = "tiny-dit"\n[strategy]\ntp = 2\npp = 1\nvpp = 1\ncp = 1\n'
        'cp_kind = "ulysses"\ndp = 2\nmicro_batch = 1\nglobal_batch = 4\n'
        'sequence_parallel = true\nrecompute = "none"\ndistributed_optimizer = false\n'
        "[allocation]\nvae_gpus = 1\ntext_gpus = 1\ntrainer_gpus = 4\n"
    )
    rc, rows, err = _torchrun(4, "tp2dp2", "tp2cp2usp", "--strategy", str(strategy))
    assert rc == 0, err
    assert [r["layout"] for r in rows] == ["tp2dp2", "tp2cp2usp", "strategy"]
    assert all(r["ok"] for r in rows), rows
    assert rows[-1]["strategy_preset"] == "tiny-dit"
    assert rows[-1]["grid"] == {"dp": 2, "pp": 1, "cp": 1, "tp": 2}


def test_check_fails_without_gradient_reduction() -> None:
    # Negative control: with CP the gradients are partial per rank until reduced.
    rc, rows, _ = _torchrun(2, "cp2u", "--no-finalize")
    assert rc == 1
    assert rows and not rows[0]["ok"]
