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
    cmd = [sys.executable, str(SCRIPT), "--quick", "--item-mib", "8", "--warmup", "1"]
    subprocess.run([*cmd, "--json", str(out)], check=True, timeout=280)
    data = json.loads(out.read_text())
    paths = {"zmq", "tcp", "plain", "plain1", "shm", "http"}
    expected = paths | ({"ucx"} if data["ucx_skipped"] is None else set())
    assert set(data["throughput"]) == expected
    for row in data["throughput"].values():
        assert 0 < row["min_gib_per_s"] <= row["gib_per_s"] <= row["max_gib_per_s"]
        assert len(row["rounds_gib_per_s"]) == data["rounds"] == 1
        assert len(row["warmup_gib_per_s"]) == data["warmup_rounds"] == 1
        assert row["items"] == 5  # items per round with --quick, every round in one process pair
    assert data["throughput"]["plain"]["transport"] == f"plain x{data['plain_socket_connections']}"
    assert data["throughput"]["plain1"]["transport"] == "plain x1"
    assert data["ratios"]["tcp_vs_plain_socket"] > 0
    assert data["ratios"]["tcp_vs_plain_socket_paired_median"] > 0
    assert len(data["tcp_vs_plain_socket_rounds"]) == data["rounds"]
    assert data["ratios"]["tcp_vs_plain_1conn"] > 0
    assert "tcp_vs_plain_socket" in data["targets_met"]
    assert data["throughput"]["shm"]["transport"] == "shm"
    assert data["throughput"]["tcp"]["transport"] == "tcp"
    assert data["throughput"]["tcp"]["item_bytes"] == 8 << 20
    assert sum(data["spray_equal"]) == 200  # every item reached exactly one group
    assert data["latency_4k_tcp"]["p50_us"] > 0
