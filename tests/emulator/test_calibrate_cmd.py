"""`step-infra calibrate` writes a profile that ClusterSpec and `plan --profile` accept."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from step_infra.cli import app


@pytest.mark.integration
def test_calibrate_writes_loadable_profile(tmp_path: Path) -> None:
    from step_infra.emulator.specs import ClusterSpec

    out = tmp_path / "profile.json"
    result = CliRunner().invoke(app, ["calibrate", "--out", str(out), "--no-gloo"])
    assert result.exit_code == 0, result.output
    cluster = ClusterSpec.from_profile(out)
    assert cluster.gpu.peak_tflops_bf16 > 0
    assert cluster.gpu.hbm_gb_s > 0
    plan = CliRunner().invoke(
        app,
        [
            "plan",
            "--model",
            "tiny-dit",
            "--profile",
            str(out),
            "--gpus",
            "1",
            "--global-batch",
            "8",
            "--out",
            str(tmp_path / "s.toml"),
            "--vae-rate",
            "0",
        ],
    )
    assert (tmp_path / "s.toml").exists(), plan.output


def test_calibrate_rejects_bad_ranks(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["calibrate", "--out", str(tmp_path / "p.json"), "--ranks", "0"]
    )
    assert result.exit_code == 2
    assert "--ranks must be >= 1" in result.output
