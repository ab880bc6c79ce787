"""End to end: 3 torchrun agents + 1 hot spare on gloo, one node made 30 % slower mid-run.

Runs the tiny plain-torch job of ``step_infra.demo.toy_worker`` under the elastic
controller (real TorchElastic agents, c10d rendezvous hosted by the controller) and reports
what an SRE asks: when was the slow node detected (step and seconds), was it evicted, did
the spare join, how long from detection to the first step after the resume, and does the
loss after the resume continue the checkpoint (max relative difference from a fault-free
single-process reference of the same job, same global batch).

    python benchmarks/telemetry_elastic.py --json runs/bench/telemetry_elastic.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from step_infra.demo.toy_worker import TOY_WORKER, reference_losses
from step_infra.elastic.controller import ElasticConfig, run_elastic_job
from step_infra.telemetry.events import read_events
from step_infra.telemetry.store import read_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--slow-at", type=int, default=15)
    parser.add_argument("--factor", type=float, default=1.3)
    parser.add_argument("--keep", type=Path, default=None, help="copy the run directory here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "telemetry-elastic"
        cfg = ElasticConfig(
            run_dir=run_dir,
            worker_args=(*TOY_WORKER, "--steps", str(args.steps), "--compute-s", "0.1"),
            nodes=3,
            spares=1,
            slow=f"node1:{args.slow_at}:{args.factor}",
            # A toy job of a few dozen steps: no eviction pays for its restart here, so it
            # evicts on the detection (margin 0) to show the machinery; jobs price it.
            eviction_margin=0.0,
        )
        result = run_elastic_job(cfg)
        events = read_events(run_dir)
        df = read_store(run_dir)
        if args.keep is not None:
            shutil.copytree(run_dir, args.keep, dirs_exist_ok=True)
    by_name: dict[str, dict] = {}
    for ev in events:
        if ev.get("source") == "controller":
            by_name.setdefault(ev["event"], ev)
    loss = df[(df["name"] == "loss") & (df["rank"] == 0)]
    last = loss[loss["attempt"] == loss["attempt"].max()].sort_values("step")
    reference = reference_losses(args.steps)
    rel = [
        abs(v - reference[s]) / abs(reference[s])
        for s, v in zip(last["step"], last["value"], strict=True)
    ]
    det = by_name.get("detection", {})
    out = {
        "nodes": 3,
        "spares": 1,
        "slow_node": "node1",
        "slow_from_step": args.slow_at,
        "slow_factor": args.factor,
        "ok": result.ok,
        "reason": result.reason,
        "detected_node": det.get("node"),
        "detected_at_step": det.get("step"),
        "steps_from_slowdown_to_detection": (
            det["step"] - args.slow_at + 1 if "step" in det else None
        ),
        "evicted": result.evicted,
        "joined": result.joined,
        "restarts": result.restarts,
        "resume_step": by_name.get("restart", {}).get("resume_step"),
        "detection_to_first_resumed_step_s": result.detection_to_resume_s,
        "loss_after_resume_max_rel_diff_vs_reference": max(rel) if rel else None,
        "story": [
            ev["event"]
            for ev in events
            if ev.get("source") == "controller" and ev["event"] != "agent_start"
        ],
        "wall_s": result.wall_s,
        "pass": bool(
            result.ok
            and result.evicted == ["node1"]
            and result.joined == ["spare0"]
            and (result.detection_to_resume_s or 1e9) < 60
            and rel
            and max(rel) < 1e-4
        ),
    }
    print(f"{'metric':<46}{'value':>22}")
    for key, value in out.items():
        if key != "story":
            print(f"{key:<46}{value!s:>22}")
    print("story: " + " -> ".join(out["story"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
