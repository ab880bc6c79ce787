"""``step-infra dashboard``: static report and a short-lived server, through the real CLI app."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from step_infra.cli import app
from step_infra.demo.simulate import write_simulated_run


def test_dashboard_report_and_serve(tmp_path: Path) -> None:
    run = write_simulated_run(tmp_path / "run", ranks=4, steps=range(10))
    runner = CliRunner()
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["dashboard", str(run), "--report", str(out)])
    assert result.exit_code == 0, result.output
    assert "STEP_INFRA_DATA" in out.read_text()
    result = runner.invoke(app, ["dashboard", str(run), "--port", "0", "--duration", "0.5"])
    assert result.exit_code == 0, result.output
    assert "http://127.0.0.1:" in result.output
    result = runner.invoke(app, ["dashboard", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not" in result.output


def test_cli_start_up_does_not_import_heavy_telemetry_modules() -> None:
    import subprocess
    import sys

    code = (
        "import sys, step_infra.cli; "
        "heavy = [m for m in ('pandas', 'pyarrow', 'opentelemetry.sdk') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
