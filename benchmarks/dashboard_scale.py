"""Dashboard at scale: API response times and payload sizes on a 4,096-rank x 1,000-step store.

Builds a synthetic store (``write_synthetic_store``: the Recorder's schema and value model,
one part file per node of 8 ranks, one rank 30 % slower from step 500) in a temporary
directory, starts the real :class:`DashboardServer` on 127.0.0.1 and measures:

* the store: rows, part files, bytes on disk, seconds to write;
* the server's first aggregation (read every part, reduce, merge), and a rebuild after one
  more part lands (what a live run costs per refresh: only the new part is read);
* each API route over HTTP, first request (cuts the document) and then the median of
  ``--repeats`` (served from the per-store-mtime cache); payload raw and gzip-compressed;
* with ``--browser`` (Debian's chromium + chromedriver): the page's load time as the
  browser measures it, navigation to a drawn page (``window.STEP_INFRA_LOAD_MS``), and the
  drill-down to one node.

    python benchmarks/dashboard_scale.py --json runs/bench/dashboard_scale.json
    python benchmarks/dashboard_scale.py --ranks 512 --steps 200   # a quick look
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import shutil
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from step_infra.demo.simulate import write_synthetic_store
from step_infra.telemetry import EventLog
from step_infra.telemetry.dashboard import DashboardServer
from step_infra.telemetry.store import store_parts, store_path

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _fetch(url: str, *, gz: bool) -> tuple[float, bytes]:
    req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"} if gz else {})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as resp:
        body = resp.read()
    return time.perf_counter() - t0, body


def _route(base: str, path: str, repeats: int) -> dict[str, Any]:
    """First and cached response time of ``path`` (ms), and its payload (bytes)."""
    first_s, raw = _fetch(base + path, gz=False)
    times = [_fetch(base + path, gz=True)[0] for _ in range(repeats)]
    _, compressed = _fetch(base + path, gz=True)
    assert json.loads(gzip.decompress(compressed)) == json.loads(raw)
    return {
        "route": path,
        "first_ms": round(1e3 * first_s, 1),
        "cached_ms": round(1e3 * statistics.median(times), 1),
        "bytes": len(raw),
        "gzip_bytes": len(compressed),
    }


def _browser_load(url: str, node: str) -> dict[str, float]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1700", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(url)
        deadline = time.monotonic() + 60
        while driver.execute_script("return document.body.dataset.ready") != "1":
            if time.monotonic() > deadline:
                raise TimeoutError("the page never became ready")
            time.sleep(0.05)
        load_ms = float(driver.execute_script("return window.STEP_INFRA_LOAD_MS"))
        t0 = time.perf_counter()
        driver.execute_script(
            "window.STEP_INFRA_DRILL = null; window.stepInfraDrill(arguments[0])", node
        )
        while not driver.execute_script("return window.STEP_INFRA_DRILL"):
            if time.perf_counter() - t0 > 60:
                raise TimeoutError("the drill-down never came")
            time.sleep(0.01)
        return {
            "load_ms": round(load_ms, 1),
            "drill_ms": round(1e3 * (time.perf_counter() - t0), 1),
        }
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def run(ranks: int, steps: int, repeats: int, browser: bool) -> dict[str, Any]:
    slow_rank = min(1234, ranks - 1)
    slow_node = f"node{slow_rank // 8}"
    out: dict[str, Any] = {"ranks": ranks, "steps": steps, "ranks_per_node": 8}
    with tempfile.TemporaryDirectory(prefix="dashboard-scale-") as tmp:
        run_dir = Path(tmp) / "run"
        t0 = time.perf_counter()
        write_synthetic_store(
            run_dir, ranks=ranks, steps=steps, slow_rank=slow_rank, slow_from=steps // 2
        )
        out["store_write_s"] = round(time.perf_counter() - t0, 2)
        parts = store_parts(run_dir)
        out["store_parts"] = len(parts)
        out["store_bytes"] = sum(n for _, n in parts)
        log = EventLog(run_dir, source="controller")
        log.emit("detection", level="rank", target=str(slow_rank), node=slow_node, step=steps // 2 + 30,
                 score=9.0, effect=0.3, evidence={"windows": list(range(5000))})  # fmt: skip
        log.emit("would_evict", node=slow_node, level="rank", target=str(slow_rank),
                 step=steps // 2 + 40, saving_s=95.0, cost_s=40.0, reason="detect-only")  # fmt: skip
        with DashboardServer(run_dir, refresh_s=0.0) as server:
            t0 = time.perf_counter()
            if not server.wait_ready(600):
                raise TimeoutError("first aggregation took over 600 s")
            snap = server.cache.snapshot()
            out["first_aggregation_s"] = round(snap.build_s, 2)
            out["rows"] = snap.model.rows
            routes = ["api/run", f"api/node?name={slow_node}", "api/event?i=0"]
            out["routes"] = [_route(server.url, r, repeats) for r in routes]
            if browser:
                out["browser"] = _browser_load(server.url, slow_node)
            # A live run: one more part lands (the first node's next 10 steps, as a new file).
            extra = Path(tmp) / "extra"
            write_synthetic_store(extra, ranks=8, steps=10, first_step=steps, seed=1)
            src = store_parts(extra)[0][0]
            tmp_part = store_path(run_dir) / ".zz-live-part.parquet.tmp"
            shutil.copy(src, tmp_part)
            tmp_part.rename(store_path(run_dir) / "zz-live-part.parquet")  # as ParquetStore does
            before = snap
            deadline = time.monotonic() + 600
            while server.cache.snapshot() is before and time.monotonic() < deadline:
                _fetch(server.url + "api/run", gz=True)
                time.sleep(0.05)
            out["rebuild_after_one_part_s"] = round(server.cache.snapshot().build_s, 2)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def _print(res: dict[str, Any]) -> None:
    print(f"dashboard at {res['ranks']} ranks x {res['steps']} steps ({res['rows']:,} rows, "
          f"{res['store_parts']} parts, {res['store_bytes'] / 1e6:.0f} MB; "
          f"written in {res['store_write_s']} s)")  # fmt: skip
    print(f"{'':<34}{'first ms':>10}{'cached ms':>11}{'bytes':>10}{'gzip':>9}")
    for r in res["routes"]:
        print(
            f"{r['route']:<34}{r['first_ms']:>10}{r['cached_ms']:>11}{r['bytes']:>10}{r['gzip_bytes']:>9}"
        )
    print(f"{'first aggregation (s)':<34}{res['first_aggregation_s']:>10}")
    print(f"{'rebuild after one new part (s)':<34}{res['rebuild_after_one_part_s']:>10}")
    if "browser" in res:
        print(f"{'browser: page ready (ms)':<34}{res['browser']['load_ms']:>10}")
        print(f"{'browser: drill-down (ms)':<34}{res['browser']['drill_ms']:>10}")
    print(f"{'peak RSS (MB)':<34}{res['peak_rss_mb']:>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--browser", action=argparse.BooleanOptionalAction, default=None,
        help="measure the page in headless chromium (default: when it is installed)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    args = parser.parse_args()
    browser = args.browser
    if browser is None:
        browser = Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()
    res = run(args.ranks, args.steps, args.repeats, browser)
    _print(res)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
