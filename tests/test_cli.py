"""The command line: --help, --version, doctor, and the console script itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from step_infra import __version__
from step_infra.cli import app

runner = CliRunner()


def test_version_prints_installed_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"step-infra {__version__}"
    assert __version__ != "0.0.0+unknown", "package metadata missing: was it installed with pip -e?"


def test_help_lists_subcommands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("doctor", "demo"):
        assert command in result.stdout


def test_unknown_subcommand_fails_with_message() -> None:
    result = runner.invoke(app, ["no-such-command"])
    assert result.exit_code != 0


def test_doctor_reports_required_stack() -> None:
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.stdout
    for component in ("torch", "megatron.core", "triton", "zmq", "grpc"):
        assert component in result.stdout


@pytest.mark.integration
def test_console_script_runs_as_a_process() -> None:
    # The script beside this interpreter, so the test checks this venv's install, not PATH's.
    script = str(Path(sys.executable).with_name("step-infra"))
    completed = subprocess.run(
        [script, "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == f"step-infra {__version__}"
