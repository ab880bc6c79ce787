"""Dashboard: data summary, static report, live server, and a real headless browser."""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from step_infra.demo.simulate import write_simulated_run, write_synthetic_store
from step_infra.telemetry import EventLog
from step_infra.telemetry.dashboard import DashboardServer, render_report, summarize_run
from step_infra.telemetry.dashboard.aggregate import StoreAggregator
from step_infra.telemetry.dashboard.data import decode_heatmap, summary_doc
from step_infra.telemetry.events import read_events
from step_infra.telemetry.recorder import Recorder, RecorderConfig
from step_infra.telemetry.store import ParquetStore, read_store

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[2]
LOAD_BUDGET_MS = 2000.0  # issue 15: the page loads in under 2 s from a 4,096 x 1,000 store


def _detect_event(run_dir: Path, *, target: str = "5", node: str = "node1") -> None:
    EventLog(run_dir, source="controller").emit(
        "detection",
        level="rank",
        target=target,
        node=node,
        step=30,
        score=9.1,
        effect=0.3,
        evidence={"peer_median": 0.09, "windows": {target: [{"window": 30, "flagged": True}]}},
    )


def _verdict_events(run_dir: Path) -> None:
    """What the controller writes after a detection: a would-evict verdict (detect-only
    policy), then an eviction (the fields of ``elastic.py``)."""
    log = EventLog(run_dir, source="controller")
    log.emit(
        "would_evict",
        node="node1",
        level="rank",
        target="5",
        step=35,
        saving_s=120.5,
        cost_s=40.0,
        reason="would have evicted at step 35, saving 120.5 s",
    )
    log.emit("eviction", node="node1", reason="straggler", evidence={}, last_step=38)


def test_summary_names_the_straggler(tmp_path: Path) -> None:
    write_simulated_run(tmp_path, ranks=8, steps=range(40), slow_rank=5, slow_from=10)
    data = summarize_run(tmp_path)
    assert data["ranks_total"] == 8 and len(data["ranks"]) == 8
    slow = [r for r in data["ranks"] if r["straggler"]]
    assert [r["rank"] for r in slow] == [5]
    assert data["ranks"][0]["rank"] == 5  # the table lists the slowest first
    assert slow[0]["slowdown"] == pytest.approx(0.3, abs=0.06)
    # The slow rank reaches the all-reduce last: about 30 % of its ~96 ms compute late.
    late = {r["rank"]: r["late_ms"] for r in data["ranks"]}
    assert max(late, key=late.get) == 5
    assert 20 < late[5] < 40 and all(v < 12 for r, v in late.items() if r != 5)
    heat = data["heatmap"]
    assert heat["metric"] == "compute" and heat["level"] == "rank" and len(heat["steps"]) == 40
    ratios = decode_heatmap(heat)
    assert ratios.shape == (8, 40)
    row = heat["rows"].index("node1/r5")
    assert np.nanmedian(ratios[row, 10:]) == pytest.approx(1.3, abs=0.05)
    assert heat["flagged"] == ["node1/r5"]
    # Compute is shown next to the waits; it encloses fwd/bwd/optimizer, which it names.
    cols = data["sections"]["columns"]
    assert [c["name"] for c in cols] == ["compute", "data", "grad_allreduce"]
    assert cols[0]["label"] == "compute (= bwd + fwd + optimizer)"
    assert cols[2] == {
        "name": "grad_allreduce",
        "kind": "collective",
        "label": "waited in grad_allreduce",
    }
    for key in ("step_time_s", "data_stall_fraction", "tokens_per_s", "mfu", "loss"):
        assert len(data["series"][key]["step"]) == 40, key
    stall = data["series"]["data_stall_fraction"]["value"]
    assert all(0 < v < 0.1 for v in stall)


def _job_like_run(run_dir: Path, *, ranks: int = 4, steps: int = 12) -> None:
    """The sections the training job records (train/job/worker.py): waits beside compute."""
    for rank in range(ranks):
        cfg = RecorderConfig(
            rank=rank, node=f"node{rank // 2}", window_steps=4, system_metrics=False
        )
        with Recorder(cfg, [ParquetStore(run_dir)]) as rec:
            for step in range(steps):
                rec.begin_step(step)
                rec.record_section("data_wait_s", 0.010)
                rec.record_section("batch_sync", 0.002)
                rec.record_section("compute", 0.100 * (1.5 if rank == 3 else 1.0))
                rec.record_arrival("grad_allreduce", arrived_unix_s=1e9 + step, wait_s=0.03)
                rec.end_step(loss=1.0, data_wait_s=0.010, step_time_s=0.2)


def test_time_per_section_shows_compute_next_to_the_waits(tmp_path: Path) -> None:
    _job_like_run(tmp_path)
    sec = summarize_run(tmp_path)["sections"]
    labels = [c["label"] for c in sec["columns"]]
    # Compute does not enclose the waits: it stands beside them, under its own name.
    assert labels == ["compute", "batch_sync", "data_wait_s", "waited in grad_allreduce"]
    means = dict(zip(sec["rows"], sec["mean_s"], strict=True))
    assert means["node1/r3"] == pytest.approx([0.15, 0.002, 0.010, 0.03], rel=1e-6)


def test_would_evict_panel_lists_detections_verdicts_and_evictions(tmp_path: Path) -> None:
    write_simulated_run(tmp_path, ranks=8, steps=range(40), slow_rank=5, slow_from=10)
    _detect_event(tmp_path)
    _verdict_events(tmp_path)
    EventLog(tmp_path, source="worker").emit("heartbeat_noise", step=1)  # not listed
    data = summarize_run(tmp_path)
    panel = data["evict_panel"]
    assert [e["event"] for e in panel] == ["eviction", "would_evict", "detection"]  # newest first
    would = panel[1]
    assert (would["node"], would["level"], would["target"], would["step"]) == (
        "node1",
        "rank",
        "5",
        35,
    )
    assert (would["saving_s"], would["cost_s"]) == (120.5, 40.0)
    assert would["reason"].startswith("would have evicted")
    assert panel[0]["step"] == 38  # an eviction's step is its last_step
    assert panel[2]["score"] == 9.1
    assert "heartbeat_noise" not in {e["event"] for e in data["events"]}
    evicted = {r["rank"] for r in data["ranks"] if r["evicted"]}
    assert evicted == {4, 5, 6, 7}  # every rank of the evicted node


def test_static_report_is_self_contained(tmp_path: Path) -> None:
    write_simulated_run(tmp_path, ranks=4, steps=range(12))
    _detect_event(tmp_path)
    _verdict_events(tmp_path)
    out = render_report(tmp_path)
    html = out.read_text()
    assert "window.STEP_INFRA_DATA" in html and '"detection"' in html and '"would_evict"' in html
    assert "http://" not in html and "https://" not in html  # no CDN, no fetches
    with pytest.raises(ValueError, match="does not exist"):
        render_report(tmp_path / "missing")


def test_synthetic_store_has_the_recorders_schema_and_values(tmp_path: Path) -> None:
    write_simulated_run(tmp_path / "rec", ranks=8, steps=range(20))
    write_synthetic_store(tmp_path / "syn", ranks=8, ranks_per_node=4, steps=20)
    rec, syn = read_store(tmp_path / "rec"), read_store(tmp_path / "syn")
    assert list(rec.dtypes) == list(syn.dtypes) and len(rec) == len(syn)
    key = ["kind", "name"]
    assert sorted(map(tuple, rec[key].drop_duplicates().to_numpy())) == sorted(
        map(tuple, syn[key].drop_duplicates().to_numpy())
    )
    a, b = rec.groupby(key)["value"].mean(), syn.groupby(key)["value"].mean()
    for name in ("fwd", "bwd", "optimizer", "compute", "data"):
        assert b["section", name] == pytest.approx(a["section", name], rel=0.03), name
    # Unlike the rank-by-rank simulation, the synthetic run knows who waits in the all-reduce.
    waits = syn[syn["kind"] == "arrival"]["value"]
    assert (waits >= 0).all() and waits.mean() > 0
    with pytest.raises(ValueError, match="ranks=0"):
        write_synthetic_store(tmp_path / "bad", ranks=0)


def test_summary_of_a_512_rank_run_is_small_and_by_node(tmp_path: Path) -> None:
    write_synthetic_store(tmp_path, ranks=512, steps=200, slow_rank=77, slow_from=100)
    data = summarize_run(tmp_path, top_n=10)
    body = json.dumps(data, separators=(",", ":"))
    assert len(body) < 80_000, len(body)  # 45 M rows at 4,096 ranks: see the benchmark
    heat = data["heatmap"]
    assert heat["level"] == "node" and len(heat["rows"]) == 64 and len(heat["steps"]) == 200
    assert heat["flagged"] == ["node9"]
    ratios = decode_heatmap(heat)
    row = heat["rows"].index("node9")
    assert np.nanmedian(ratios[row, 100:]) == pytest.approx(1.3, abs=0.05)
    assert np.nanmedian(np.delete(ratios, row, axis=0)[:, 100:]) < 1.12
    assert data["ranks_total"] == 512 and len(data["ranks"]) == 10
    assert data["ranks"][0]["member"] == "node9/r77" and data["ranks"][0]["straggler"]
    # Waited at the collective vs arrived late: the straggler arrives last and waits least.
    top = data["ranks"][0]
    assert top["wait_ms"] < 1.0 and top["late_ms"] > 2 * data["ranks"][1]["late_ms"]
    assert data["sections"]["rows"][:2] == ["median rank", "node9/r77"]


def test_incremental_refresh_reads_only_new_parts(tmp_path: Path) -> None:
    write_simulated_run(tmp_path, ranks=4, steps=range(20), slow_rank=2, slow_from=0)
    agg = StoreAggregator(str(tmp_path))
    first = agg.refresh()
    assert first > 0 and agg.refresh() == 0  # nothing new: nothing read
    write_simulated_run(tmp_path, ranks=4, steps=range(20, 30), slow_rank=2, seed=1)
    assert agg.refresh() == 4  # one window of 10 steps per rank
    model = agg.model()
    assert len(model.steps) == 30
    events = read_events(tmp_path)
    incremental = summary_doc(model, events, run="r")
    scratch = summarize_run(tmp_path)
    for key in ("ranks", "heatmap", "sections", "series"):
        assert incremental[key] == scratch[key], key


def _get(url: str, *, gz: bool = False) -> tuple[bytes, dict[str, str]]:
    req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"} if gz else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read(), dict(resp.headers)


def test_server_serves_page_script_json_drilldown_and_events(tmp_path: Path) -> None:
    write_simulated_run(tmp_path, ranks=4, steps=range(12))
    EventLog(tmp_path, source="controller").emit(
        "detection",
        level="node",
        node="node0",
        target="node0",
        step=11,
        evidence={"big": "x" * 9000},
    )
    with DashboardServer(tmp_path, refresh_s=0.0) as server:
        page = _get(server.url)[0].decode()
        assert "StepTelemetry" in page and tmp_path.name in page
        assert b"drawHeatmap" in _get(server.url + "static/dashboard.js")[0]
        data = json.loads(_get(server.url + "api/run")[0])
        assert len(data["ranks"]) == 4
        # Large evidence stays out of the main document and comes on demand.
        det = next(e for e in data["events"] if e["event"] == "detection")
        assert det["evidence"] is None and det["evidence_bytes"] > 9000
        full = json.loads(_get(server.url + f"api/event?i={det['i']}")[0])
        assert full["evidence"]["big"] == "x" * 9000
        node = json.loads(_get(server.url + "api/node?name=node0")[0])
        assert [r["rank"] for r in node["ranks"]] == [0, 1, 2, 3]
        assert node["heatmap"]["level"] == "rank" and node["sections"]["rows"][0] == "median rank"
        body, headers = _get(server.url + "api/run", gz=True)
        assert headers.get("Content-Encoding") == "gzip"
        assert json.loads(gzip.decompress(body))["ranks_total"] == 4
        for bad in ("nope", "api/node?name=node9", "api/event?i=99", "api/nothing"):
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(server.url + bad, timeout=5)


def test_server_rebuilds_only_when_the_store_changes(tmp_path: Path) -> None:
    write_simulated_run(tmp_path, ranks=4, steps=range(10))
    with DashboardServer(tmp_path, refresh_s=0.0) as server:
        assert server.wait_ready(30)
        first = server.cache.snapshot()
        _get(server.url + "api/run")
        assert server.cache.snapshot() is first  # nothing changed: same build, same bytes
        write_simulated_run(tmp_path, ranks=4, steps=range(10, 20), seed=1)

        def rebuilt() -> bool:
            _get(server.url + "api/run")  # a request notices the change and rebuilds
            return server.cache.snapshot() is not first

        assert _wait(rebuilt, timeout_s=30)
        data = json.loads(_get(server.url + "api/run")[0])
        assert data["heatmap"]["steps"][-1] == 19


def _browser(user_data_dir: str):  # type: ignore[no-untyped-def]
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(
            f"needs Debian chromium at {CHROMIUM} and {CHROMEDRIVER}: "
            "apt-get update && apt-get install -y chromium chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1700",
        f"--user-data-dir={user_data_dir}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def _rows(driver, table: str = "ranks") -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """(rank, straggler flag) of every row of a ranks table, read in one go."""
    rows = driver.execute_script(
        f"return [...document.querySelectorAll('#{table} tbody tr')]"
        ".map(r => [r.cells[0].textContent, r.dataset.straggler])"
    )
    return [tuple(r) for r in rows]


def _wait(predicate, timeout_s: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.25)
    return False


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_live_page_in_headless_chromium_shows_injected_straggler(tmp_path: Path) -> None:
    run_dir = tmp_path / "live-run"
    write_simulated_run(run_dir, ranks=8, steps=range(20))  # healthy so far
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    driver = _browser(profile)
    try:
        with DashboardServer(run_dir, refresh_s=0.0) as server:
            driver.set_page_load_timeout(30)
            driver.get(server.url)

            assert _wait(lambda: len(_rows(driver)) == 8), "the page never listed the 8 ranks"
            assert all(flag == "0" for _, flag in _rows(driver))
            # Inject a straggler while the page is open: rank 5 becomes 30 % slower.
            write_simulated_run(
                run_dir, ranks=8, steps=range(20, 50), slow_rank=5, slow_from=20, seed=1
            )
            _detect_event(run_dir)
            _verdict_events(run_dir)

            def flagged() -> list[str]:
                return [rank for rank, flag in _rows(driver) if flag == "1"]

            assert _wait(lambda: flagged() == ["5"]), f"straggler not shown: {flagged()}"
            events = driver.execute_script(
                "return [...document.querySelectorAll('#events li[data-event=detection]')]"
                ".map(li => li.textContent)"
            )
            assert events and "node1" in events[0]
            verdicts = driver.execute_script(
                "return [...document.querySelectorAll('#evict tbody tr')]"
                ".map(tr => [tr.dataset.event, tr.textContent])"
            )
            assert [v[0] for v in verdicts] == ["eviction", "would_evict", "detection"]
            assert "saves 120.5 s > costs 40.0 s" in verdicts[1][1]
            headers = driver.execute_script(
                "return [...document.querySelectorAll('#ranks th')].map(th => th.textContent)"
            )
            assert "arrived late at collectives" in headers and "waited at collectives" in headers
            shot = tmp_path / "dashboard.png"
            assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
            keep = REPO / "runs" / "telemetry"
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, keep / "dashboard.png")
        # The static report renders the same page from a file, without a server.
        report = render_report(run_dir)
        driver.get(report.as_uri())
        assert _wait(lambda: len(_rows(driver)) == 8)
        assert flagged() == ["5"]
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _scale_check(run_dir: Path, *, ranks: int, steps: int, slow_rank: int, shot: Path | None):  # type: ignore[no-untyped-def]
    """Load the page of a synthetic run in chromium: it must be ready within the budget
    (measured by the browser, from navigation to the drawn page), and clicking the slow
    node's heatmap row must open its ranks."""
    write_synthetic_store(
        run_dir, ranks=ranks, steps=steps, slow_rank=slow_rank, slow_from=steps // 2
    )
    slow_node = f"node{slow_rank // 8}"
    _detect_event(run_dir, target=str(slow_rank), node=slow_node)
    EventLog(run_dir, source="controller").emit(
        "would_evict",
        node=slow_node,
        level="rank",
        target=str(slow_rank),
        step=steps // 2 + 40,
        saving_s=95.0,
        cost_s=41.0,
        reason=f"would have evicted at step {steps // 2 + 40}, saving 95.0 s (detect-only)",
    )
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    driver = _browser(profile)
    try:
        with DashboardServer(run_dir, refresh_s=60.0) as server:
            assert server.wait_ready(240), "the server never finished its first aggregation"
            driver.set_page_load_timeout(30)
            driver.get(server.url)
            assert _wait(lambda: driver.execute_script("return document.body.dataset.ready") == "1")
            load_ms = driver.execute_script("return window.STEP_INFRA_LOAD_MS")
            assert load_ms < LOAD_BUDGET_MS, f"page ready after {load_ms:.0f} ms"
            data = driver.execute_script("return window.STEP_INFRA_LAST")
            assert data["ranks_total"] == ranks and data["heatmap"]["level"] == "node"
            assert _rows(driver)[0] == (str(slow_rank), "1")
            verdicts = driver.execute_script(
                "return [...document.querySelectorAll('#evict tbody tr')].map(tr => tr.dataset.event)"
            )
            assert verdicts == ["would_evict", "detection"]
            # Drill down by clicking the slow node's row of the heatmap canvas.
            from selenium.webdriver.common.action_chains import ActionChains
            from selenium.webdriver.common.by import By

            canvas = driver.find_element(By.ID, "heatmap")
            rows = data["heatmap"]["rows"]
            height = canvas.size["height"] - 18  # the step axis below the cells
            y = (rows.index(slow_node) + 0.5) * height / len(rows)
            ActionChains(driver).move_to_element_with_offset(
                canvas, 0, int(y - canvas.size["height"] / 2)
            ).click().perform()
            assert _wait(lambda: len(_rows(driver, "drill-ranks")) == 8), "no drill-down"
            assert (str(slow_rank), "1") in _rows(driver, "drill-ranks")
            title = driver.execute_script(
                "return document.getElementById('drill-title').textContent"
            )
            assert slow_node in title
            if shot is not None:
                driver.execute_script("window.scrollTo(0, 0)")
                driver.save_screenshot(str(shot))
            return load_ms
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_page_of_512_ranks_loads_within_budget_and_drills_down(tmp_path: Path) -> None:
    _scale_check(tmp_path / "run512", ranks=512, steps=200, slow_rank=77, shot=None)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_page_of_4096_ranks_x_1000_steps_loads_within_budget(tmp_path: Path) -> None:
    keep = REPO / "runs" / "telemetry"
    keep.mkdir(parents=True, exist_ok=True)
    _scale_check(
        tmp_path / "run4096",
        ranks=4096,
        steps=1000,
        slow_rank=1234,
        shot=keep / "dashboard-4096.png",
    )
