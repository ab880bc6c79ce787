"""`step-infra demo` runs its stages into the run directory and says where the outputs went."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from step_infra.demo import DemoStageError, run_demo, stage_environment


def test_demo_writes_summary(tmp_path: Path) -> None:
    console = Console(record=True, width=200)
    summary_path = run_demo(
        tmp_path / "demo", console=console, stages=(("environment", stage_environment),)
    )
    summary = json.loads(summary_path.read_text())
    assert summary["stages"] == ["environment"]
    for path in summary["outputs"].values():
        assert Path(path).exists()
    assert str((tmp_path / "demo").resolve()) in console.export_text()


def test_failing_stage_stops_the_demo(tmp_path: Path) -> None:
    def broken(out: Path, console: Console) -> dict[str, str]:
        raise DemoStageError("stage did not reach its goal")

    with pytest.raises(DemoStageError, match="did not reach"):
        run_demo(tmp_path / "demo", console=Console(), stages=(("broken", broken),))
    assert not (tmp_path / "demo" / "summary.json").exists()
