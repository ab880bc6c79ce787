"""The fitted presets against every published run in shared/calibration."""

from __future__ import annotations

import numpy as np
import pytest

from step_infra.emulator.calibration import default_calibration_dir, load_rows, row_error


@pytest.fixture(scope="module")
def rows():  # type: ignore[no-untyped-def]
    try:
        default_calibration_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"shared/calibration not beside this checkout: {exc}")
    return load_rows()


def test_throughput_mape_within_ten_percent(rows) -> None:  # type: ignore[no-untyped-def]
    errors = np.array([row_error(r)[0] for r in rows])
    assert len(rows) == 22
    assert np.mean(np.abs(errors)) <= 0.10, f"MAPE {np.mean(np.abs(errors)):.1%}"
    assert np.max(np.abs(errors)) <= 0.25, f"worst row {np.max(np.abs(errors)):.1%}"


def test_megatron96_conversion(rows) -> None:  # type: ignore[no-untyped-def]
    """137 hardware TFLOP/s with full recompute is ~3/4 of that in model FLOPs."""
    first = rows[0]
    assert first.name == "gpt-1.7b"
    assert first.published_tflops_per_gpu == pytest.approx(137 * 0.75, rel=0.02)
