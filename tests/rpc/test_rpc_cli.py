"""The rpc CLI: light import, registry prints its address and serves, bench is registered."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from typer.testing import CliRunner

from step_infra.cli import app
from step_infra.rpc.registry import RegistryClient


def test_cli_module_imports_nothing_heavy() -> None:
    code = (
        "import sys, step_infra.rpc.cli; "
        "print([m for m in ('torch', 'grpc', 'zmq') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_registry_command_serves_with_token() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "step_infra.cli", "registry", "--token", "tok", "--run-s", "20"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "registry listening on 127.0.0.1:" in line
        address = line.split()[-1]
        assert RegistryClient(address, "tok").create_pipe("x") == "spray"
        with pytest.raises(grpc.RpcError):
            RegistryClient(address, "").create_pipe("x")
    finally:
        proc.kill()
        proc.wait(10)


def test_rpc_bench_help() -> None:
    result = CliRunner().invoke(app, ["rpc", "bench", "--help"])
    assert result.exit_code == 0 and "--quick" in result.output
