"""The rpc CLI: light import, registry prints its address and serves, bench is registered."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


@pytest.mark.timeout(60)
def test_rpc_bench_runs_the_installed_module_from_anywhere(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``rpc bench`` needs no source checkout: it runs ``python -m step_infra.rpc.bench``."""
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    result = CliRunner().invoke(app, ["rpc", "bench", "--quick", "--json", "out.json"])
    assert result.exit_code == 0, result.output
    assert calls == [
        [sys.executable, "-m", "step_infra.rpc.bench", "--json", "out.json", "--quick"]
    ]
    out = subprocess.run(
        [sys.executable, "-m", "step_infra.rpc.bench", "--help"],
        cwd=tmp_path,  # not the repository: nothing is found through a relative path
        capture_output=True,
        text=True,
        timeout=50,
        check=True,
    )
    assert "--quick" in out.stdout and "--item-mib" in out.stdout


def test_rpc_bench_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from step_infra.rpc import bench

    monkeypatch.setattr(bench, "missing_requirements", lambda: ["Flask (the baseline)"])
    result = CliRunner().invoke(app, ["rpc", "bench", "--quick"])
    assert result.exit_code == 1
    assert "Flask (the baseline)" in result.output and "step-infra[dev]" in result.output
    assert bench.main(["--quick"]) == 2  # the module itself starts nothing either
