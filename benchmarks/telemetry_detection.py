"""Straggler detection under cluster-shaped noise: false detections, detection rate, latency, cost.

Noise (``step_infra.telemetry.noise.ClusterNoise``, defaults): log-normal jitter (3 %), per-node
shared jitter (2 %), AR(1) correlated jitter per rank (3 %, phi 0.9), 1 % single-step spikes of
2-5x, unsynchronized GC-like pauses (0.5-1.5 steps, every 20-60 steps), whole-node one-step
hiccups (0.5 % per node-step, 1.3-2x) and job-wide slow phases (1 % a step, 5-30 steps, 1.2-2x).
``--harsh`` multiplies the jitter and the event rates (see ``HARSH``).

* healthy: ``--runs`` seeded runs of 500 steps each on 8 x 8, 2 x 2 and 8 x 2 ranks; every
  detection is a false one (an eviction needs a detection, so false evictions <= this);
* faults (onset at step 50 on 8 x 8 ranks unless said): one rank 15 % slower, one node 10 %
  slower, a rank drifting to 30 % slower over 200 steps, an intermittent rank (1.5x in bursts
  of 8-15 steps, 15-30 apart), one rank 15 % slower on 8 x 2, and a 2 x 2 job with one node
  30 % slower from step 0. Found = a detection naming the rank or its node (the node for a
  slow node); latency = steps from the onset to it;
* two paths: the detector's API (``observe_array``) with the default ``DetectorConfig``, and
  the job's own path (per-rank ``compute`` rows -> ``StepFeed`` -> ``JOB_DETECTOR`` through
  ``StragglerWatch``) for the 2 x 2 and 8 x 2 layouts;
* controller cost: CPU seconds of ``StragglerWatch.poll`` (feed + detector) per step at 64,
  512 and 4,096 ranks, rows arriving 10 steps at a time as the recorders write them.

    python benchmarks/telemetry_detection.py --json runs/bench/telemetry_detection.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from step_infra.elastic.policy import DetectOnly
from step_infra.elastic.watch import StragglerWatch, WatchState
from step_infra.telemetry.detector import DetectorConfig, StragglerDetector
from step_infra.telemetry.noise import ClusterNoise, Fault, simulate_steps
from step_infra.train.job.config import JOB_DETECTOR

STEPS = 500
HARSH = ClusterNoise(
    iid_sigma=0.05, node_sigma=0.04, ar_sigma=0.05, ar_phi=0.97, spike_p=0.02,
    hiccup_p=0.02, phase_p=0.03,
)  # fmt: skip


def _rank_path(
    seed: int, nodes: int, per_node: int, noise: ClusterNoise, fault: Fault | None
) -> list[tuple[int, str, str]]:
    rng = np.random.default_rng(seed)
    ranks = nodes * per_node
    det = StragglerDetector(
        DetectorConfig(), nodes={r: f"node{r // per_node}" for r in range(ranks)}
    )
    members = tuple(range(ranks))
    found = []
    steps = simulate_steps(
        rng, nodes=nodes, ranks_per_node=per_node, steps=STEPS, noise=noise, fault=fault
    )
    for step, times in enumerate(steps):
        found += [(step, d.level, d.target) for d in det.observe_array(step, members, times)]
    return found


def _rows(
    block: list[tuple[int, np.ndarray]], per_node: int, name: str = "compute"
) -> pd.DataFrame:
    """Store rows (the recorders' schema) for a few steps of every rank."""
    ranks = len(block[0][1])
    steps = np.repeat([s for s, _ in block], ranks)
    rank = np.tile(np.arange(ranks), len(block))
    values = np.concatenate([t for _, t in block])
    sections = pd.DataFrame(
        {"step": steps, "rank": rank, "node": [f"node{r // per_node}" for r in rank],
         "attempt": 1, "kind": "section", "name": name, "value": values, "t_unix_s": 0.0}
    )  # fmt: skip
    step_rows = sections.assign(kind="step", name="step", value=values * 1.2)
    return pd.concat([sections, step_rows], ignore_index=True)


def _watch(config: DetectorConfig) -> StragglerWatch:
    return StragglerWatch(config, DetectOnly(), None, steps_total=STEPS, restart_s=30.0)


def _job_path(
    seed: int, nodes: int, per_node: int, noise: ClusterNoise, fault: Fault | None
) -> list[tuple[int, str, str]]:
    rng = np.random.default_rng(seed)
    watch = _watch(JOB_DETECTOR)
    state = WatchState(generation=1, active_nodes=[f"node{n}" for n in range(nodes)])
    block: list[tuple[int, np.ndarray]] = []
    steps = simulate_steps(
        rng, nodes=nodes, ranks_per_node=per_node, steps=STEPS, noise=noise, fault=fault
    )
    for step, times in enumerate(steps):
        block.append((step, times))
        if len(block) == 10:
            watch.poll(_rows(block, per_node), state)
            block = []
    return [(d.window, d.level, d.target) for d in watch.stats.detections]


Path_ = Callable[[int, int, int, ClusterNoise, Fault | None], list[tuple[int, str, str]]]

FAULTS: dict[str, tuple[int, int, Callable[[np.random.Generator], Fault]]] = {
    "rank 15 % slower": (8, 8, lambda g: Fault(kind="rank", target=int(g.integers(64)), factor=1.15, onset=50)),
    "node 10 % slower": (8, 8, lambda g: Fault(kind="node", target=int(g.integers(8)), factor=1.10, onset=50)),
    "rank drifting to +30 %": (8, 8, lambda g: Fault(kind="drift", target=int(g.integers(64)), factor=1.3, onset=50)),
    "intermittent rank 1.5x": (8, 8, lambda g: Fault(kind="intermittent", target=int(g.integers(64)), factor=1.5, onset=50)),
    "rank 15 % slower, 8 x 2": (8, 2, lambda g: Fault(kind="rank", target=int(g.integers(16)), factor=1.15, onset=50)),
    "2 x 2, node 30 % slower from step 0": (2, 2, lambda g: Fault(kind="node", target=int(g.integers(2)), factor=1.3, onset=0)),
}  # fmt: skip


def _healthy(path: Path_, layouts: list[tuple[int, int]], runs: int, noise: ClusterNoise) -> dict:
    out = {}
    for nodes, per_node in layouts:
        false = [path(10_000 + s, nodes, per_node, noise, None) for s in range(runs)]
        out[f"{nodes} x {per_node}"] = {
            "runs": runs,
            "false_detections": sum(len(f) for f in false),
            "runs_with_false_detections": sum(bool(f) for f in false),
            "examples": [f[:2] for f in false if f][:3],
        }
    return out


def _faults(path: Path_, names: list[str], runs: int, noise: ClusterNoise) -> dict:
    out = {}
    for name in names:
        nodes, per_node, make = FAULTS[name]
        latencies, wrong = [], 0
        for s in range(runs):
            fault = make(np.random.default_rng(20_000 + s))
            good = (
                {f"node{fault.target}"}
                if fault.kind == "node"
                else {str(fault.target), f"node{fault.target // per_node}"}
            )
            found = path(30_000 + s, nodes, per_node, noise, fault)
            hits = [step for step, _, target in found if target in good]
            wrong += sum(target not in good for _, _, target in found)
            if hits:
                latencies.append(hits[0] - fault.onset)
        out[name] = {
            "runs": runs,
            "found_rate": len(latencies) / runs,
            "latency_steps_median": float(np.median(latencies)) if latencies else None,
            "latency_steps_p90": float(np.percentile(latencies, 90)) if latencies else None,
            "wrong_detections": wrong,
        }
    return out


def _cpu_per_step(ranks: int, steps: int = 200, per_node: int = 8) -> float:
    """CPU seconds of feed + detector per step, rows arriving 10 steps a poll."""
    rng = np.random.default_rng(0)
    nodes = ranks // per_node
    watch = _watch(DetectorConfig())
    state = WatchState(generation=1, active_nodes=[f"node{n}" for n in range(nodes)])
    polls = []
    sim = simulate_steps(
        rng, nodes=nodes, ranks_per_node=per_node, steps=steps, noise=ClusterNoise()
    )
    block: list[tuple[int, np.ndarray]] = []
    for step, times in enumerate(sim):
        block.append((step, times))
        if len(block) == 10:
            polls.append(_rows(block, per_node))
            block = []
    t0 = time.process_time()
    for rows in polls:
        watch.poll(rows, state)
    return (time.process_time() - t0) / steps


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--runs", type=int, default=30, help="seeded runs per case")
    parser.add_argument("--quick", action="store_true", help="10 runs per case")
    parser.add_argument("--harsh", action="store_true", help="harsher noise (HARSH)")
    args = parser.parse_args()
    runs = 10 if args.quick else args.runs
    noise = HARSH if args.harsh else ClusterNoise()
    t0 = time.perf_counter()
    result = {
        "noise": {k: getattr(noise, k) for k in type(noise).__slots__},  # type: ignore[attr-defined]
        "steps_per_run": STEPS,
        "detector": {k: getattr(DetectorConfig(), k) for k in DetectorConfig.__slots__},  # type: ignore[attr-defined]
        "job_detector": {k: getattr(JOB_DETECTOR, k) for k in DetectorConfig.__slots__},  # type: ignore[attr-defined]
        "healthy_rank_path": _healthy(_rank_path, [(8, 8), (2, 2), (8, 2)], runs, noise),
        "healthy_job_path": _healthy(_job_path, [(2, 2), (8, 2)], runs, noise),
        "faults_rank_path": _faults(_rank_path, list(FAULTS), runs, noise),
        "faults_job_path": _faults(
            _job_path,
            ["rank 15 % slower, 8 x 2", "2 x 2, node 30 % slower from step 0"],
            runs,
            noise,
        ),
        "cpu_ms_per_step": {str(r): round(1e3 * _cpu_per_step(r), 3) for r in (64, 512, 4096)},
    }
    false_total = sum(
        v["false_detections"]
        for key in ("healthy_rank_path", "healthy_job_path")
        for v in result[key].values()
    )
    found_min = min(
        v["found_rate"]
        for key in ("faults_rank_path", "faults_job_path")
        for v in result[key].values()
    )
    result["pass"] = bool(
        false_total == 0 and found_min >= 0.95 and result["cpu_ms_per_step"]["4096"] < 10.0
    )
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"noise: {'harsh' if args.harsh else 'default'} ClusterNoise, {STEPS} steps a run")
    print(f"{'healthy runs':<40}{'path':>6}{'runs':>6}{'false det.':>12}")
    for key, label in (("healthy_rank_path", "api"), ("healthy_job_path", "job")):
        for layout, v in result[key].items():
            print(f"{layout:<40}{label:>6}{v['runs']:>6}{v['false_detections']:>12}")
    print(f"{'fault':<40}{'path':>6}{'runs':>6}{'found':>8}{'median':>8}{'p90':>8}{'wrong':>7}")
    for key, label in (("faults_rank_path", "api"), ("faults_job_path", "job")):
        for name, v in result[key].items():
            print(
                f"{name:<40}{label:>6}{v['runs']:>6}{v['found_rate']:>8.0%}"
                f"{_fmt(v['latency_steps_median']):>8}{_fmt(v['latency_steps_p90']):>8}"
                f"{v['wrong_detections']:>7}"
            )
    for ranks, ms in result["cpu_ms_per_step"].items():
        print(f"feed + detector CPU per step at {ranks:>5} ranks: {ms:.3f} ms")
    print(f"pass {result['pass']}  wall {result['wall_s']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
