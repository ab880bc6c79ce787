"""The eviction story as one call: a tiny elastic job with one node made slow.

``step-infra telemetry-demo`` and ``make demo`` both run it: 3 torchrun agents (+ hot spares)
on gloo, one node slowed mid-run, the detector finds it, the policy evicts it, a spare joins,
and the job resumes from its checkpoint. Kept apart from the CLI so the demo can chain it with
the other stages.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console

from step_infra.demo.toy_worker import TOY_WORKER
from step_infra.elastic.controller import ElasticConfig, ElasticResult, run_elastic_job


def run_eviction_story(
    run_dir: Path,
    *,
    console: Console,
    steps: int = 60,
    slow_at: int = 15,
    factor: float = 1.3,
    eviction: str = "evict",
    spares: int = 1,
    min_nodes: int = 3,
) -> tuple[ElasticResult, Path]:
    """Run the job into a fresh ``run_dir``, print its controller events; return the result
    and the path of the static report."""
    from step_infra.telemetry.dashboard import render_report
    from step_infra.telemetry.events import read_events

    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = ElasticConfig(
        run_dir=run_dir,
        worker_args=(*TOY_WORKER, "--steps", str(steps), "--compute-s", "0.1"),
        policy=eviction,
        spares=spares,
        min_nodes=min_nodes,
        slow=f"node1:{slow_at}:{factor}",
        # A toy job of a few dozen steps: no eviction pays for its restart here, so it
        # evicts on the detection (margin 0) to show the machinery; jobs price it.
        eviction_margin=0.0,
    )
    console.print(
        f"3 agents + {spares} spare(s); node1 becomes {factor}x slower at step {slow_at} ..."
    )
    result = run_elastic_job(cfg)
    for ev in read_events(run_dir):
        if ev["source"] == "controller" and ev["event"] != "agent_start":
            detail = {k: v for k, v in ev.items() if k not in ("t_unix_s", "source", "evidence")}
            console.print(f"  [bold]{ev['event']:<10}[/] {detail}")
    report = render_report(run_dir)
    colour = "green" if result.ok else "red"
    console.print(
        f"[{colour}]{result.reason}[/]: evicted {result.evicted}, joined {result.joined}, "
        f"detection -> first resumed step {result.detection_to_resume_s} s, wall {result.wall_s} s"
    )
    console.print(f"report: [bold]{report}[/]; live view: step-infra dashboard {run_dir}")
    return result, report
