"""Which steps the job's measured step time is taken over: a real telemetry store written by
the ranks' recorders, with checkpoint-write steps, an attempt's first steps and a slowed node
that must each stay out of the healthy median (and show up where the report puts them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from step_infra.telemetry.recorder import Recorder, RecorderConfig
from step_infra.telemetry.store import ParquetStore
from step_infra.train.job.config import Faults, micro_t2v
from step_infra.train.job.report import step_metrics

HEALTHY_S, CHECKPOINT_S, SLOW_S = 0.2, 0.5, 0.3


def _write(run_dir: Path, steps: range, *, every: int, slow_node: str, slow_from: int) -> None:
    for rank in range(2):
        node = f"node{rank}"
        cfg = RecorderConfig(rank=rank, node=node, system_metrics=False, window_steps=5)
        with Recorder(cfg, [ParquetStore(run_dir)]) as rec:
            for step in steps:
                seconds = CHECKPOINT_S if step > 0 and step % every == 0 else HEALTHY_S
                if node == slow_node and step >= slow_from:
                    seconds = max(seconds, SLOW_S)
                rec.begin_step(step)
                rec.record_section("data_wait_s", 0.0)
                rec.end_step(loss=1.0, tokens=1.0, data_wait_s=0.0, step_time_s=seconds)


def test_healthy_median_leaves_out_checkpoint_first_and_slowed_steps(tmp_path: Path) -> None:
    cfg = micro_t2v().replace(
        steps=30, checkpoint_every=5, faults=Faults(slow="node1:20:1.3", kill=None)
    )
    _write(tmp_path, range(30), every=5, slow_node="node1", slow_from=20)
    m = step_metrics(tmp_path, cfg)
    # steps 0 and 1 (start-up), 5, 10, 15 (checkpoint writes), 20..29 (node1 slowed) are out
    assert m["healthy_steps"] == 30 - 2 - 3 - 10
    assert m["measured_step_s"] == pytest.approx(HEALTHY_S)
    assert m["checkpoint_steps"] == 3
    assert m["checkpoint_step_s"] == pytest.approx(CHECKPOINT_S)
    # the all-steps mean keeps every step: what a run's wall clock pays
    # (steps 20 and 25 write a checkpoint on the slowed node: the slower of the two counts)
    expected = (17 * HEALTHY_S + 5 * CHECKPOINT_S + 8 * SLOW_S) / 30
    assert m["mean_step_s_all"] == pytest.approx(expected, abs=1e-4)
