"""`step-infra demo` writes its outputs into the run directory and says where."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from step_infra.demo import run_demo


def test_demo_writes_summary(tmp_path: Path) -> None:
    console = Console(record=True, width=120)
    summary_path = run_demo(tmp_path / "demo", console=console)
    summary = json.loads(summary_path.read_text())
    assert "environment" in summary["stages"]
    for path in summary["outputs"].values():
        assert Path(path).exists()
    assert str((tmp_path / "demo").resolve()) in console.export_text()
