"""The job's report: the telemetry dashboard page plus what the people running the job ask.

:func:`job_metrics` answers, from the run directory alone: was every sample trained exactly
once (an audit of the trainers' ledgers against the stream's ids), what was the data stall,
how did the measured step time compare with the emulator's prediction, how busy were the
encoder servers, and which faults were injected and how each was handled.
:func:`write_job_report` renders that above the StepTelemetry dashboard (per-rank step-time
heatmap, loss, events with their evidence) in one self-contained ``report.html``, with the
generated clips inlined.
"""

from __future__ import annotations

import base64
import html
import json
import statistics
from pathlib import Path
from typing import Any

from step_infra.telemetry.dashboard import render_report
from step_infra.telemetry.events import read_events
from step_infra.train.job.config import JobConfig, trainer_layout

FAULT_EVENTS = (
    "fault_injected", "detection", "would_evict", "eviction_deferred", "straggler_recovered",
    "eviction", "spare_activated", "join", "restart", "recovered", "hang", "job_failed",
    "interrupted",
)  # fmt: skip


def audit_ledger(run_dir: Path, cfg: JobConfig) -> dict[str, Any]:
    """Check that each step trained exactly its ``global_batch`` ids, once, across replicas.

    A step re-run after a restart is judged by its latest generation (the earlier run of it
    was rolled back with the checkpoint)."""
    by_step: dict[int, dict[int, list[list[int]]]] = {}
    for path in sorted((run_dir / "ledger").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            by_step.setdefault(rec["step"], {}).setdefault(rec["generation"], []).append(rec["ids"])
    lost: list[int] = []
    repeated: list[int] = []
    rerun = 0
    for step in range(cfg.steps):
        gens = by_step.get(step)
        expected = set(range(step * cfg.global_batch, (step + 1) * cfg.global_batch))
        if not gens:
            lost.extend(sorted(expected))
            continue
        rerun += len(gens) > 1
        ids = [i for part in gens[max(gens)] for i in part]
        repeated.extend(sorted({i for i in ids if ids.count(i) > 1}))
        lost.extend(sorted(expected - set(ids)))
        repeated.extend(sorted(set(ids) - expected))
    return {
        "steps_audited": cfg.steps,
        "samples_expected": cfg.steps * cfg.global_batch,
        "lost": lost,
        "repeated": repeated,
        "steps_rerun_after_restart": rerun,
        "exactly_once": not lost and not repeated,
    }


def _slowed(cfg: JobConfig) -> tuple[str, int] | None:
    if not cfg.faults.slow:
        return None
    node, start, _ = cfg.faults.slow.split(":")
    return node, int(start)


def step_metrics(run_dir: Path, cfg: JobConfig) -> dict[str, Any]:
    """Measured step time and data stall, healthy steady state and whole run."""
    from step_infra.telemetry.store import read_store

    df = read_store(run_dir)
    if df.empty:
        return {}
    df = df.sort_values("attempt").drop_duplicates(["rank", "step", "kind", "name"], keep="last")
    steps = df[(df["kind"] == "step") & (df["name"] == "step")]
    wait = df[(df["kind"] == "section") & (df["name"] == "data_wait_s")]
    per_step = steps.groupby("step")["value"].max()
    wait_step = wait.groupby("step")["value"].mean()
    first_of_attempt = set(steps.groupby("attempt")["step"].min())
    excluded = set(first_of_attempt) | {0, 1}
    slow = _slowed(cfg)
    slowed: set[int] = set()
    if slow is not None:
        hit = df[(df["node"] == slow[0]) & (df["step"] >= slow[1])]
        slowed = set(hit["step"])
    # the step after each save runs beside the async checkpoint write (its staging and
    # serialization take this host's cores): an I/O event the emulator's training step does
    # not price, measured on its own below
    saving = {s for s in per_step.index if s > 0 and s % cfg.checkpoint_every == 0}
    unsteady = excluded | slowed
    healthy = [s for s in per_step.index if s not in unsteady and s not in saving]
    checkpointed = [s for s in per_step.index if s in saving and s not in unsteady]
    steady = [s for s in per_step.index if s not in excluded]
    loss = df[(df["kind"] == "gauge") & (df["name"] == "loss")].groupby("step")["value"].first()

    def frac(sel: list[int]) -> float | None:
        total = float(per_step.loc[sel].sum()) if sel else 0.0
        return round(float(wait_step.reindex(sel).fillna(0).sum()) / total, 5) if total else None

    return {
        "steps_recorded": len(per_step),
        "measured_step_s": round(statistics.median(per_step.loc[healthy]), 4) if healthy else None,
        "healthy_steps": len(healthy),
        "checkpoint_step_s": (
            round(statistics.median(per_step.loc[checkpointed]), 4) if checkpointed else None
        ),
        "checkpoint_steps": len(checkpointed),
        "mean_step_s_all": round(float(per_step.mean()), 4),
        "slowed_steps": len(slowed),
        "data_stall_fraction": frac(steady),
        "data_stall_fraction_all_steps": frac(list(per_step.index)),
        "recovery_wait_s": round(
            float(wait_step.reindex(sorted(first_of_attempt)).fillna(0).sum()), 2
        ),
        "loss_first": round(float(loss.iloc[0]), 5) if len(loss) else None,
        "loss_last": round(float(loss.iloc[-1]), 5) if len(loss) else None,
        "loss_by_step": {int(k): float(v) for k, v in loss.items()},
    }


def servers(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "servers").glob("*.json"))]


def job_metrics(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    cfg = JobConfig.load(run_dir)
    out: dict[str, Any] = {"job": cfg.name, "layout": trainer_layout(cfg)}
    out.update(step_metrics(run_dir, cfg))
    out["audit"] = audit_ledger(run_dir, cfg)
    pred_path = run_dir / "prediction.json"
    if pred_path.exists():
        pred = json.loads(pred_path.read_text())
        out["predicted_step_s"] = round(pred["step_time_s"], 4)
        out["prediction_terms"] = {k: round(v, 4) for k, v in pred.get("terms", {}).items()}
        if out.get("measured_step_s"):
            out["prediction_error"] = round(pred["step_time_s"] / out["measured_step_s"] - 1, 4)
    out["servers"] = servers(run_dir)
    out["faults"] = [e for e in read_events(run_dir) if e["event"] in FAULT_EVENTS]
    exp = run_dir / "encoder_experiment.json"
    if exp.exists():
        out["encoder_experiment"] = json.loads(exp.read_text())
    return out


def _row(k: str, v: Any) -> str:
    return f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"


_TERM_NAMES = {
    "training_step_s": "training step (emulator: compute, dispatch, TP/DP collectives, optimizer)",
    "data_sync_s": "data sync (all-gather of sample holders)",
    "encoders_on_host_s": "encoder servers' CPU on the trainers' cores",
}


def _terms(terms: dict[str, float]) -> str:
    return "; ".join(f"{_TERM_NAMES.get(k, k)} {v:.3f} s" for k, v in terms.items()) or "-"


def _job_section(run_dir: Path, m: dict[str, Any]) -> str:
    audit = m["audit"]
    verdict = (
        f"every one of {audit['samples_expected']} samples trained exactly once"
        if audit["exactly_once"]
        else f"LOST {len(audit['lost'])} / REPEATED {len(audit['repeated'])} samples"
    )
    rows = [
        _row("layout", m["layout"]),
        _row("data audit", f"{verdict}; {audit['steps_rerun_after_restart']} step(s) re-run after a restart"),
        _row("measured step (healthy steady state, median)", f"{m.get('measured_step_s')} s over {m.get('healthy_steps')} steps"),
        _row("steps beside an async checkpoint write (median, not in the above)", f"{m.get('checkpoint_step_s')} s over {m.get('checkpoint_steps')} steps"),
        _row("mean step, every step (faults, restarts and checkpoints included)", f"{m.get('mean_step_s_all')} s"),
        _row("emulator prediction", f"{m.get('predicted_step_s')} s (error {m.get('prediction_error')})"),
        _row("prediction terms", _terms(m.get("prediction_terms", {}))),
        _row("data stall (steady state)", m.get("data_stall_fraction")),
        _row("data stall (all steps, recovery included)", m.get("data_stall_fraction_all_steps")),
        _row("waiting for re-sprayed data after restarts", f"{m.get('recovery_wait_s')} s"),
        _row("loss first -> last", f"{m.get('loss_first')} -> {m.get('loss_last')}"),
    ]  # fmt: skip
    srv = "".join(
        f"<tr><td>{html.escape(s['name'])}</td><td>{s['items']}</td><td>{s['rate_cap']:g}/s</td>"
        f"<td>{s['utilization']:.0%}</td><td>{s['busy_s']:.1f} s</td></tr>"
        for s in m["servers"]
    )
    faults = "".join(
        f"<li><b>{html.escape(e['event'])}</b> "
        f"{html.escape(json.dumps({k: v for k, v in e.items() if k not in ('t_unix_s', 'event')})[:400])}</li>"
        for e in m["faults"]
    )
    exp = m.get("encoder_experiment")
    exp_html = ""
    if exp:
        exp_rows = "".join(
            f"<tr><td>{r['vae_servers']} VAE server(s) x {r['vae_rate']:g}/s = {r['vae_servers'] * r['vae_rate']:g}/s</td>"
            f"<td>{r['consumption_per_s']:.1f}/s</td><td>{r['data_stall_fraction']}</td><td>{html.escape(r['why'])}</td></tr>"
            for r in exp["runs"]
        )  # fmt: skip
        exp_html = (
            "<h3>Encoder split vs data stall</h3><table><tr><th>encoders</th><th>trainers "
            f"consume</th><th>data stall</th><th>why</th></tr>{exp_rows}</table>"
        )
    clips = ""
    for gif in sorted((run_dir / "samples").glob("*.gif")):
        data = base64.b64encode(gif.read_bytes()).decode()
        clips += (
            f'<figure style="display:inline-block;margin:6px"><img src="data:image/gif;base64,{data}">'
            f"<figcaption>{html.escape(gif.stem.split('-', 1)[-1])}</figcaption></figure>"
        )
    return (
        '<section class="wide"><h2>Training job</h2>'
        f"<table>{''.join(rows)}</table>"
        "<h3>Encoder servers</h3><table><tr><th>server</th><th>items</th><th>rate cap</th>"
        f"<th>utilization</th><th>encode time</th></tr>{srv}</table>{exp_html}"
        f"<h3>Faults and how they were handled</h3><ol>{faults or '<li>none</li>'}</ol>"
        f"<h3>Generated clips</h3>{clips or '<p>none (the job did not finish)</p>'}</section>"
    )


def write_job_report(run_dir: str | Path) -> Path:
    """``<run_dir>/report.html`` (dashboard + job section) and ``job_metrics.json``."""
    run_dir = Path(run_dir)
    metrics = job_metrics(run_dir)
    (run_dir / "job_metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    out = render_report(run_dir)
    page = out.read_text()
    page = page.replace("<main>", "<main>\n" + _job_section(run_dir, metrics), 1)
    out.write_text(page)
    return out
