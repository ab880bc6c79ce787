"""The GPU suite's CPU dry run: the same script as on a GPU, tiny shapes, Triton interpreted.

It runs in ``make test`` so that the one command prepared for a GPU session still works
when a GPU is lent: every section runs or says why it skipped, and the kernels compute
what their references compute (within each dtype's tolerance, as on the GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(420)
def test_gpu_suite_dry_run_covers_every_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu_suite.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_suite.py"),
            "--dry-run",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "2"},
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["dry_run"] is True and "errors" not in doc, (doc.get("errors"), proc.stdout[-2000:])
    kernels = doc["kernels"]
    cases = {(r.get("case") or r.get("kernel"), r["dtype"]) for r in kernels}
    for dtype in ("float32", "float16"):
        for name in ("odd length", "unequal q/k", "per-sample key lengths", "causal", "with LSE",
                     "adaln_modulate", "gated_residual", "qk_norm_rope"):  # fmt: skip
            assert (name, dtype) in cases
    assert all(r["ok"] for r in kernels), [r for r in kernels if not r["ok"]]
    assert "lse" in next(r for r in kernels if r.get("case") == "with LSE")["errors"]
    speed = doc["speed"]
    assert speed["attention"][0]["sdpa_fwd_tflops"] > 0 and len(speed["elementwise"]) == 3
    tuned = speed["autotune"]  # every candidate timed (or its failure said), the best named
    assert len(tuned["fwd_bwd_s"]) == 3 and tuned["best"] in tuned["fwd_bwd_s"]
    dit = doc["dit"]["rows"]
    assert [r["attention"] for r in dit] == ["ours", "sdpa"] and all(r["step_s"] > 0 for r in dit)
    assert doc["emulator"]["predicted_s"] > 0
    train = doc["train"]  # the streaming job end to end, on gloo here, killed once
    assert train["ok"] and train["restarts"] >= 1 and train["exactly_once"], (
        train,
        proc.stdout[-2000:],
    )
    assert "rpc" in doc["seconds"]  # run, or said why not
    assert "GPU suite on cpu (dry run)" in proc.stdout
    assert "skipped: " in proc.stdout  # what the CPU lacks is named, not silently dropped


def test_gpu_suite_refuses_an_unknown_section() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--sections", "kernel"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "unknown sections ['kernel']" in proc.stderr
