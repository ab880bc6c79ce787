"""Dashboard: data summary, static report, live server, and a real headless browser."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from step_infra.telemetry import EventLog
from step_infra.telemetry.dashboard import DashboardServer, render_report, summarize_run
from step_infra.telemetry.simulate import write_simulated_run

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[2]


def _detect_event(run_dir: Path) -> None:
    EventLog(run_dir, source="controller").emit(
        "detection",
        level="rank",
        target="5",
        node="node1",
        step=30,
        score=9.1,
        effect=0.3,
        evidence={"peer_median": 0.09, "windows": {"5": [{"window": 30, "flagged": True}]}},
    )


def test_summary_names_the_straggler(tmp_path: Path) -> None:
    write_simulated_run(tmp_path, ranks=8, steps=range(40), slow_rank=5, slow_from=10)
    data = summarize_run(tmp_path)
    assert len(data["ranks"]) == 8
    slow = [r for r in data["ranks"] if r["straggler"]]
    assert [r["rank"] for r in slow] == [5]
    assert slow[0]["slowdown"] == pytest.approx(0.3, abs=0.06)
    # The slow rank reaches the all-reduce last: about 30 % of its ~96 ms compute late.
    late = {r["rank"]: r["late_ms"] for r in data["ranks"]}
    assert max(late, key=late.get) == 5
    assert 20 < late[5] < 40 and all(v < 12 for r, v in late.items() if r != 5)
    assert data["heatmap"]["metric"] == "compute" and len(data["heatmap"]["steps"]) == 40
    # "compute" encloses fwd/bwd/optimizer: the stacked breakdown leaves it out.
    assert set(data["sections"]["names"]) == {"data", "fwd", "bwd", "optimizer"}
    for key in ("step_time_s", "data_stall_fraction", "tokens_per_s", "mfu", "loss"):
        assert len(data["series"][key]["step"]) == 40, key
    stall = data["series"]["data_stall_fraction"]["value"]
    assert all(0 < v < 0.1 for v in stall)


def test_static_report_is_self_contained(tmp_path: Path) -> None:
    write_simulated_run(tmp_path, ranks=4, steps=range(12))
    _detect_event(tmp_path)
    out = render_report(tmp_path)
    html = out.read_text()
    assert "window.STEP_INFRA_DATA" in html and '"detection"' in html
    assert "http://" not in html and "https://" not in html  # no CDN, no fetches
    with pytest.raises(ValueError, match="does not exist"):
        render_report(tmp_path / "missing")


def test_server_serves_page_script_and_json(tmp_path: Path) -> None:
    write_simulated_run(tmp_path, ranks=4, steps=range(12))
    with DashboardServer(tmp_path, refresh_s=0.0) as server:
        page = urllib.request.urlopen(server.url, timeout=5).read().decode()
        assert "StepTelemetry" in page and tmp_path.name in page
        js = urllib.request.urlopen(server.url + "static/dashboard.js", timeout=5).read()
        assert b"drawHeatmap" in js
        data = json.loads(urllib.request.urlopen(server.url + "api/run", timeout=5).read())
        assert len(data["ranks"]) == 4
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(server.url + "nope", timeout=5)


def _browser(user_data_dir: str):  # type: ignore[no-untyped-def]
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

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
        "--window-size=1400,1200",
        f"--user-data-dir={user_data_dir}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def _rows(driver) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """(rank, straggler flag) of every row of the ranks table, read in one go."""
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#ranks tbody tr')]"
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
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(
            f"needs Debian chromium at {CHROMIUM} and {CHROMEDRIVER}: "
            "apt-get update && apt-get install -y chromium chromium-driver"
        )
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

            def flagged() -> list[str]:
                return [rank for rank, flag in _rows(driver) if flag == "1"]

            assert _wait(lambda: flagged() == ["5"]), f"straggler not shown: {flagged()}"
            events = driver.execute_script(
                "return [...document.querySelectorAll('#events li[data-event=detection]')]"
                ".map(li => li.textContent)"
            )
            assert events and "node1" in events[0]
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
