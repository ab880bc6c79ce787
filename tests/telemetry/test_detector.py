"""StragglerDetector, policies and the events log."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from step_infra.telemetry import (
    DetectOnly,
    DetectorConfig,
    EventLog,
    Evict,
    StragglerDetector,
    make_policy,
    read_events,
)


def _feed(
    det: StragglerDetector,
    steps: int,
    slow: dict[int, float],
    *,
    seed: int = 0,
    ranks: int = 16,
    onset: int = 0,
) -> list:
    rng = np.random.default_rng(seed)
    found = []
    for step in range(steps):
        times = 0.1 * np.exp(rng.normal(0, 0.05, ranks))
        if step >= onset:
            for r, f in slow.items():
                times[r] *= f
        found += det.observe(step, dict(enumerate(times)))
    return found


def test_slow_rank_is_detected_after_warmup_with_evidence() -> None:
    cfg = DetectorConfig(warmup_windows=10)
    det = StragglerDetector(cfg, nodes={r: f"n{r // 4}" for r in range(16)})
    found = _feed(det, 40, {5: 1.2})
    assert len(found) == 1
    d = found[0]
    assert d.level == "rank" and d.target == "5" and d.node == "n1"
    assert d.window >= cfg.warmup_windows + cfg.smooth_windows - 1
    assert d.effect > 0.1 and d.score >= cfg.threshold
    assert d.evidence["windows"]["5"][-1]["flagged"]


def test_no_detection_during_warmup_or_without_straggler() -> None:
    det = StragglerDetector(DetectorConfig(warmup_windows=100))
    assert _feed(det, 100, {5: 2.0}) == []
    assert _feed(StragglerDetector(), 500, {}) == []


def test_small_effect_is_ignored_even_if_significant() -> None:
    # Almost no jitter: a 3% slowdown is many sigmas but under the 5% minimum effect.
    det = StragglerDetector(DetectorConfig(warmup_windows=0, mad_floor=0.001))
    rng = np.random.default_rng(0)
    found = []
    for step in range(50):
        times = 0.1 * np.exp(rng.normal(0, 0.001, 8))
        times[2] *= 1.03
        found += det.observe(step, dict(enumerate(times)))
    assert found == []


def test_one_noisy_window_is_not_persistent() -> None:
    det = StragglerDetector(DetectorConfig(warmup_windows=0, smooth_windows=1))
    values = dict.fromkeys(range(8), 0.1)
    for step in range(10):
        v = dict(values)
        if step == 5:
            v[3] = 0.3
        assert det.observe(step, v) == []


def test_whole_node_slow_is_attributed_to_the_node() -> None:
    det = StragglerDetector(
        DetectorConfig(warmup_windows=5), nodes={r: f"n{r // 4}" for r in range(16)}
    )
    found = _feed(det, 40, {4: 1.25, 5: 1.25, 6: 1.25, 7: 1.25})
    assert [(d.level, d.target) for d in found] == [("node", "n1")]
    assert found[0].members == ("4", "5", "6", "7")


def test_config_errors_name_the_values() -> None:
    with pytest.raises(ValueError, match="persist_k=4, persist_n=3"):
        DetectorConfig(persist_k=4, persist_n=3)


def test_policies(tmp_path: Path) -> None:
    det = StragglerDetector(DetectorConfig(warmup_windows=5))
    found = _feed(det, 40, {1: 1.3})
    assert DetectOnly().decide(found, spares_left=1) == []
    evict = Evict(max_evictions=1)
    assert evict.decide(found, spares_left=0) == []  # no spare: keep the slow node
    decisions = evict.decide(found, spares_left=1)
    assert [d.node for d in decisions] == ["1"]
    assert evict.decide(found, spares_left=1) == []  # never twice
    assert isinstance(make_policy("detect"), DetectOnly)
    with pytest.raises(ValueError, match="'detect' or 'evict', got 'kill'"):
        make_policy("kill")


def test_events_log_is_one_json_object_per_line(tmp_path: Path) -> None:
    log_a = EventLog(tmp_path, source="controller")
    log_b = EventLog(tmp_path, source="rank0")
    log_a.emit("detection", node="n1", evidence={"score": np.float64(7.5)})
    log_b.emit("restart", attempt=1)
    events = read_events(tmp_path)
    assert [e["event"] for e in events] == ["detection", "restart"]
    assert events[0]["evidence"]["score"] == 7.5 and events[1]["source"] == "rank0"
    assert len((tmp_path / "events.jsonl").read_text().splitlines()) == 2


def _pair_run(slow: dict[str, float], onset: int = 20, steps: int = 60) -> list:
    cfg = DetectorConfig(warmup_windows=3, smooth_windows=3, threshold=4.0, mad_floor=0.02)
    det = StragglerDetector(cfg)
    rng = np.random.default_rng(1)
    found = []
    for step in range(steps):
        shared = rng.lognormal(0, 0.15)  # a busy host slows both nodes alike: not a straggler
        values = {
            node: 0.1 * shared * (slow.get(node, 1.0) if step >= onset else 1.0)
            * rng.lognormal(0, 0.02)
            for node in ("node0", "node1")
        }  # fmt: skip
        found += det.observe(step, values)
    return found


def test_two_nodes_are_judged_against_their_own_baseline() -> None:
    found = _pair_run({"node1": 1.3})
    assert [d.target for d in found] == ["node1"]
    assert found[0].evidence["mode"].startswith("own baseline")
    assert 20 <= found[0].window <= 30


def test_two_nodes_slowed_together_blame_nobody() -> None:
    assert _pair_run({"node0": 1.3, "node1": 1.3}) == []
    assert _pair_run({}) == []


def test_two_nodes_one_window_spike_is_not_a_straggler() -> None:
    cfg = DetectorConfig(warmup_windows=3, smooth_windows=3, threshold=4.0, mad_floor=0.02)
    det = StragglerDetector(cfg)
    found = []
    for step in range(40):
        spike = 4.0 if step == 20 else 1.0  # one slow step (a GC pause, a page-fault storm)
        found += det.observe(step, {"node0": 0.05 * spike, "node1": 0.05 * (1 + 0.01 * (step % 3))})
    assert found == []


def test_two_nodes_small_slowdown_is_below_the_pair_threshold() -> None:
    assert _pair_run({"node1": 1.09}) == []  # no majority: small effects are not blamed


def _jittery_pair(slow: float, seed: int, cfg: DetectorConfig) -> list:
    """Two nodes on a shared host: their compute ratio jitters by 0.10 (log, per step, as
    measured on the 2-core demo host); node1 is ``slow`` times slower from window 18."""
    det = StragglerDetector(cfg)
    rng = np.random.default_rng(seed)
    found = []
    for step in range(60):
        ratio = np.exp(rng.normal(0, 0.10)) * (slow if step >= 18 else 1.0)
        found += det.observe(step, {"node0": 0.06, "node1": 0.06 * ratio})
    return found


def test_two_nodes_on_a_noisy_host_capped_spread_and_longer_baseline() -> None:
    """The training job's settings (``launcher.JOB_DETECTOR``) against the former ones, on the
    same 50 seeded runs: every 30 % slowdown caught (the former missed some) and fewer
    healthy nodes blamed."""
    from step_infra.train.job.launcher import JOB_DETECTOR

    former = DetectorConfig(
        warmup_windows=5, smooth_windows=3, baseline_windows=5, threshold=4.0, mad_floor=0.02
    )
    seeds = range(50)
    caught = {
        name: [_jittery_pair(1.3, s, cfg) for s in seeds]
        for name, cfg in (("job", JOB_DETECTOR), ("former", former))
    }
    assert all(found and found[0].target == "node1" for found in caught["job"])
    assert not all(caught["former"])
    false = {
        name: sum(bool(_jittery_pair(1.0, s, cfg)) for s in seeds)
        for name, cfg in (("job", JOB_DETECTOR), ("former", former))
    }
    assert false["job"] <= false["former"] / 2
    with pytest.raises(ValueError, match="pair_max_sigma must be > 0 or None, got 0"):
        DetectorConfig(pair_max_sigma=0)
