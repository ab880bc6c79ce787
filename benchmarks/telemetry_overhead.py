"""Telemetry overhead: a 100 ms step with 20 sections and 10 counters, telemetry on vs off.

"On" records every section, counter and step into a Recorder exporting to the local Parquet
store *and* an OpenTelemetry MeterProvider with a live Prometheus endpoint (scraped once per
block); "off" runs the same work with no telemetry calls. Both run in the same process,
interleaved in blocks (on/off/off/on ...) so drift in machine load hits both equally. Each
step is 20 sections of CPU work (a single-threaded numpy matmul loop calibrated to 5 ms).
Reported: mean step time of each mode, overhead = mean_on / mean_off - 1, and the hot-path
cost of one section / counter measured in isolation.

    python benchmarks/telemetry_overhead.py --json runs/bench/telemetry_overhead.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: one thread, less noise
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from step_infra.telemetry import (
    OTelConfig,
    OTelSink,
    ParquetStore,
    Recorder,
    RecorderConfig,
    make_meter_provider,
)

SECTIONS = 20
COUNTERS = 10


def _calibrate(target_s: float) -> int:
    a = np.random.default_rng(0).random((96, 96))
    reps = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ a
        dt = time.perf_counter() - t0
        if dt > 0.02:
            break
        reps *= 2
    return max(1, round(reps * target_s / dt))


def _work(a: np.ndarray, reps: int) -> None:
    for _ in range(reps):
        a @ a


def _step_off(a: np.ndarray, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(SECTIONS):
        _work(a, reps)
    return time.perf_counter() - t0


def _step_on(rec: Recorder, step: int, a: np.ndarray, reps: int, names: list[str]) -> float:
    t0 = time.perf_counter()
    rec.begin_step(step)
    for name in names:
        with rec.section(name):
            _work(a, reps)
    for c in range(COUNTERS):
        rec.counter(f"counter{c}", 1.0)
    rec.end_step(loss=1.0, tokens=4096.0, data_wait_s=0.0)
    return time.perf_counter() - t0


def _hot_path_ns(n: int = 20000) -> dict[str, float]:
    rec = Recorder(RecorderConfig(capacity=4 * n, system_metrics=False))
    rec.begin_step(0)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        with rec.section("s"):
            pass
    t1 = time.perf_counter_ns()
    for _ in range(n):
        rec.counter("c")
    t2 = time.perf_counter_ns()
    return {"section_ns": (t1 - t0) / n, "counter_ns": (t2 - t1) / n}


def _bounded_memory(steps: int = 6000, capacity: int = 65_536) -> dict[str, float]:
    """10 minutes of 100 ms steps (simulated step count) with nobody exporting."""
    import tracemalloc

    rec = Recorder(RecorderConfig(capacity=capacity, system_metrics=False))
    names = [f"section{i:02d}" for i in range(SECTIONS)]
    tracemalloc.start()
    for step in range(steps):
        rec.begin_step(step)
        for name in names:
            with rec.section(name):
                pass
        for c in range(COUNTERS):
            rec.counter(f"counter{c}")
        rec.end_step()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    stats = rec.stats()
    return {
        "steps": steps,
        "records_offered": steps * (SECTIONS + COUNTERS + 1),
        "capacity": capacity,
        "buffered": stats["buffered"],
        "dropped": stats["dropped"],
        "traced_peak_bytes": peak,
        "traced_current_bytes": current,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--quick", action="store_true", help="4 blocks instead of 16")
    parser.add_argument("--block-steps", type=int, default=25)
    args = parser.parse_args()
    blocks = 4 if args.quick else 16
    step_s = 0.100
    reps = _calibrate(step_s / SECTIONS)
    a = np.random.default_rng(0).random((96, 96))
    names = [f"section{i:02d}" for i in range(SECTIONS)]
    times: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        tp = make_meter_provider(OTelConfig(prometheus_port=0), rank=0, node="bench", run="b")
        sinks = [ParquetStore(tmp), OTelSink(tp.provider)]
        rec = Recorder(RecorderConfig(window_steps=10, flush_interval_s=0.5), sinks)
        url = f"http://127.0.0.1:{tp.prometheus_port}/metrics"
        for _ in range(3):  # warm-up, untimed
            _step_off(a, reps)
            _step_on(rec, -1, a, reps, names)
        step = 0
        order = ["on", "off", "off", "on"]
        for block in range(blocks):
            mode = order[block % 4]
            for _ in range(args.block_steps):
                if mode == "on":
                    times["on"].append(_step_on(rec, step, a, reps, names))
                    step += 1
                else:
                    times["off"].append(_step_off(a, reps))
            if mode == "on":
                urllib.request.urlopen(url, timeout=5).read()  # a scrape, as Prometheus would
        rec.close()
        stats = rec.stats()
        tp.shutdown()
        parts = len(list((Path(tmp) / "telemetry.parquet").glob("*.parquet")))
    on, off = np.array(times["on"]), np.array(times["off"])
    overhead = float(on.mean() / off.mean() - 1.0)
    hot = _hot_path_ns()
    memory = _bounded_memory()
    per_step_hot_s = (SECTIONS * hot["section_ns"] + COUNTERS * hot["counter_ns"]) / 1e9
    result = {
        "step_target_s": step_s,
        "sections_per_step": SECTIONS,
        "counters_per_step": COUNTERS,
        "steps_per_mode": int(on.size),
        "mean_step_off_s": float(off.mean()),
        "mean_step_on_s": float(on.mean()),
        "median_step_off_s": float(np.median(off)),
        "median_step_on_s": float(np.median(on)),
        "overhead": overhead,
        "overhead_median": float(np.median(on) / np.median(off) - 1.0),
        "hot_path_section_ns": hot["section_ns"],
        "hot_path_counter_ns": hot["counter_ns"],
        "hot_path_fraction_of_step": per_step_hot_s / step_s,
        "store_parts_written": parts,
        "recorder": stats,
        "bounded_memory": memory,
        "pass": overhead < 0.01,
    }
    print(f"{'metric':<30}{'value':>16}")
    for key in (
        "steps_per_mode",
        "mean_step_off_s",
        "mean_step_on_s",
        "overhead",
        "overhead_median",
        "hot_path_section_ns",
        "hot_path_counter_ns",
        "hot_path_fraction_of_step",
        "store_parts_written",
        "pass",
    ):
        value = result[key]
        print(f"{key:<30}{value:>16.6g}" if isinstance(value, float) else f"{key:<30}{value!s:>16}")
    print(
        f"no exporter for {memory['steps']} steps: {memory['buffered']} records buffered "
        f"(capacity {memory['capacity']}), {memory['dropped']} dropped and counted, "
        f"peak {memory['traced_peak_bytes'] / 2**20:.1f} MiB traced"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
