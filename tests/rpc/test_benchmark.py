"""benchmarks/rpc_throughput.py runs end to end and writes the JSON the Makefile expects."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "rpc_throughput.py"


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_benchmark_quick_json(tmp_path: Path) -> None:
    out = tmp_path / "rpc.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--item-mib", "8", "--json", str(out)]
    subprocess.run(cmd, check=True, timeout=280)
    data = json.loads(out.read_text())
    expected = {"zmq", "tcp", "shm", "http"} | ({"ucx"} if data["ucx_skipped"] is None else set())
    assert set(data["throughput"]) == expected
    assert data["throughput"]["shm"]["transport"] == "shm"
    assert data["throughput"]["tcp"]["transport"] == "tcp"
    assert data["throughput"]["tcp"]["item_bytes"] == 8 << 20
    assert sum(data["spray_equal"]) == 200  # every item reached exactly one group
    assert data["latency_4k_tcp"]["p50_us"] > 0
