"""Straggler detection on simulated ranks: detection rate and latency, false detections.

Jitter model: every rank's per-step compute time is ``base * exp(N(0, sigma))`` (log-normal,
sigma = 0.05, i.e. about 5 % jitter), independent across ranks and steps. In each detection
trial one random rank becomes 15 % slower (x1.15) at the first step after warm-up; the
trial passes when the detector names that rank within 10 steps. The false-detection run has
no slow rank at all for 1,000 steps x 64 ranks (repeated over a few seeds for margin).
One window = one step here, the detector's finest granularity. A third check slows all 8
ranks of one node by 15 % and requires one node-level detection naming that node.

    python benchmarks/telemetry_detection.py --json runs/bench/telemetry_detection.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from step_infra.telemetry.detector import DetectorConfig, StragglerDetector


def _trial(
    rng: np.random.Generator,
    cfg: DetectorConfig,
    *,
    ranks: int,
    sigma: float,
    slowdown: float,
    horizon: int,
) -> tuple[bool, int | None, int]:
    det = StragglerDetector(cfg, nodes={r: f"node{r // 8}" for r in range(ranks)})
    slow = int(rng.integers(ranks))
    onset = cfg.warmup_windows  # first post-warm-up step (0-based)
    wrong = 0
    for step in range(onset + horizon):
        times = 0.1 * np.exp(rng.normal(0.0, sigma, ranks))
        if step >= onset:
            times[slow] *= slowdown
        for d in det.observe(step, dict(enumerate(times))):
            if d.target == str(slow):
                return True, step - onset + 1, wrong
            wrong += 1
    return False, None, wrong


def _node_trial(
    rng: np.random.Generator,
    cfg: DetectorConfig,
    *,
    ranks: int,
    sigma: float,
    slowdown: float,
    horizon: int,
    per_node: int = 8,
) -> bool:
    """All ranks of one node slowed: the detection must name the node, not its ranks."""
    det = StragglerDetector(cfg, nodes={r: f"node{r // per_node}" for r in range(ranks)})
    node = int(rng.integers(ranks // per_node))
    onset = cfg.warmup_windows
    for step in range(onset + horizon):
        times = 0.1 * np.exp(rng.normal(0.0, sigma, ranks))
        if step >= onset:
            times[node * per_node : (node + 1) * per_node] *= slowdown
        found = det.observe(step, dict(enumerate(times)))
        if found:
            return [(d.level, d.target) for d in found] == [("node", f"node{node}")]
    return False


def _false_run(seed: int, cfg: DetectorConfig, *, ranks: int, sigma: float, steps: int) -> int:
    rng = np.random.default_rng(seed)
    det = StragglerDetector(cfg, nodes={r: f"node{r // 8}" for r in range(ranks)})
    found = 0
    for step in range(steps):
        times = 0.1 * np.exp(rng.normal(0.0, sigma, ranks))
        found += len(det.observe(step, dict(enumerate(times))))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--quick", action="store_true", help="fewer trials and seeds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ranks, sigma, slowdown, within = 64, 0.05, 1.15, 10
    trials = 50 if args.quick else 200
    false_seeds = 1 if args.quick else 20
    steps = 1000
    cfg = DetectorConfig()
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    latencies: list[int] = []
    wrong_in_trials = 0
    detected_in_time = 0
    for _ in range(trials):
        ok, latency, wrong = _trial(
            rng, cfg, ranks=ranks, sigma=sigma, slowdown=slowdown, horizon=3 * within
        )
        wrong_in_trials += wrong
        if ok and latency is not None:
            latencies.append(latency)
            detected_in_time += latency <= within
    node_ok = sum(
        _node_trial(rng, cfg, ranks=ranks, sigma=sigma, slowdown=slowdown, horizon=3 * within)
        for _ in range(trials // 4)
    )
    false_counts = [
        _false_run(1000 + s, cfg, ranks=ranks, sigma=sigma, steps=steps) for s in range(false_seeds)
    ]
    rate = detected_in_time / trials
    result = {
        "ranks": ranks,
        "jitter_model": f"log-normal: t = 0.1 s * exp(N(0, {sigma})) per rank per step, iid",
        "slowdown": slowdown,
        "trials": trials,
        "detected_within_steps": within,
        "detection_rate": rate,
        "latency_steps_median": float(np.median(latencies)) if latencies else None,
        "latency_steps_max": int(max(latencies)) if latencies else None,
        "wrong_rank_detections_in_trials": wrong_in_trials,
        "node_attribution_trials": trials // 4,
        "node_attribution_rate": node_ok / (trials // 4),
        "false_detection_steps": steps,
        "false_detection_seeds": false_seeds,
        "false_detections_first_seed": false_counts[0],
        "false_detections_all_seeds": int(sum(false_counts)),
        "detector": {
            k: getattr(cfg, k)
            for k in cfg.__slots__  # type: ignore[attr-defined]
        },
        "pass": rate >= 0.95 and false_counts[0] == 0,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(f"{'metric':<44}{'value':>14}")
    for key in (
        "ranks",
        "slowdown",
        "trials",
        "detection_rate",
        "latency_steps_median",
        "latency_steps_max",
        "wrong_rank_detections_in_trials",
        "node_attribution_trials",
        "node_attribution_rate",
        "false_detection_steps",
        "false_detections_first_seed",
        "false_detections_all_seeds",
        "pass",
        "wall_s",
    ):
        print(f"{key:<44}{result[key]!s:>14}")
    print(f"jitter: {result['jitter_model']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
