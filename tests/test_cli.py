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


def test_tables_piped_to_a_log_keep_their_column_names() -> None:
    """``make demo > log``: rich would assume 80 columns and print "ki…", "re…", "st…"."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "COLUMNS"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "step_infra.cli",
            "plan",
            "--model",
            "tiny-dit",
            "--gpu",
            "h100-sxm",
            "--gpus",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    ).stdout
    header = next(line for line in out.splitlines() if "tp" in line and "pp" in line)
    for name in ("kind", "recompute", "dist opt", "step s", "TFLOP/s/GPU", "GB/GPU"):
        assert name in header, header
    assert "…" not in out.split("chosen:")[0]


def test_megatrons_missing_te_warning_is_not_printed() -> None:
    code = "import step_infra, megatron.core.optimizer, megatron.core.optimizer.clip_grads"
    err = subprocess.run(
        [sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120
    ).stderr
    assert "Transformer Engine and Apex are not installed" not in err
