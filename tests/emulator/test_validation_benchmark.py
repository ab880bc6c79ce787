"""The validation benchmark runs and writes the figures the issue asks for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_emulator_validation_json(tmp_path: Path) -> None:
    from step_infra.emulator.calibration import default_calibration_dir

    try:
        default_calibration_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"no calibration data: {exc}")
    out = tmp_path / "v.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "emulator_validation.py"), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 22
    assert result["mape"] <= 0.10
    assert result["search"]["seconds"] < 5.0 and result["search"]["top_fits_80gb"]
    assert {row["dominant_loss"] for row in result["rows"]} <= {
        "compute efficiency",
        "TP communication",
        "CP communication",
        "pipeline bubble + PP",
        "DP communication",
        "optimizer",
    }
