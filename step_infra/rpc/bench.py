"""StepRPC throughput, latency and spray balance, each against a baseline in the same run.

Throughput: the steady state of a long-lived pipe (trainers keep theirs for days). Each path
(a raw pyzmq PUSH/PULL zero-copy loop, StepRPC over tcp, StepRPC over shm, the authors' pickle
over HTTP, plain sockets) runs as one producer process and one consumer process on this host,
all started once and alive for all rounds; connections, lanes and receive buffers are set up in
the first rounds and reused after. A round is ``--items`` items (16 by default, 5 with
``--quick``) of ``--item-mib`` MiB (64: one bf16 tensor and one int64 tensor), sent when the
parent says go; the consumer stamps each item's arrival and the round's rate is
``(items - 1) / (last arrival - first arrival)``. The first ``--warmup`` rounds (2) of every
path are reported but not counted; ``--rounds`` counted rounds (5; 1 with ``--quick``) follow.
Rounds interleave: round r of zmq, then of tcp, plain, plain1, shm, http, then round r + 1, so
load from other jobs on a shared host hits every path alike and round r of tcp and of plain run
back to back; only the pair whose round it is moves bytes (the others wait, StepRPC producers
polling to keep their links' leases). Each row is its median counted round, min and max beside
it. The http path is restructured the same way: its server lives for all rounds and its client
drives each round (it still opens a new connection per item, as the baseline does).

The pickle-over-HTTP baseline follows the authors' public ``api/call_remote_server.py``:
a Flask app served by Werkzeug's threaded server (what ``app.run(threaded=True)`` starts), one
request per item, the handler holding a global lock while it pickles the item and returns it
as the response body; the client sends a small pickled request on a new connection per item
(as their ``call_api_gen`` opens a session per call) and unpickles the reply. One deviation
makes it faster, not slower: the client reads the body in one call instead of 1 KiB chunks.

The plain-socket baseline bounds what tcp can reach: ``plain`` uses as many TCP connections as
StepRPC's tcp lanes (the ``lanes`` default of the producer and consumer configs), ``plain1``
one connection. Each connection carries a contiguous stripe of the same tensor bytes, cut as
the lanes cut it, sent with blocking ``sendall`` and received with ``recv_into`` into one
preallocated buffer reused for every item; one thread per connection on each side, kernel
default socket options, and nothing else: no header, credit or ack per item (the receiving
threads do not wait for each other, so a connection may run an item ahead into the buffer).
So tcp against plain is StepRPC's cost over the bare transfer.

``tcp_vs_plain_socket`` divides the two rows' medians (the ``>= 0.9`` target);
``tcp_vs_plain_socket_paired_median`` is the median of the per-round ratios of adjacent rounds.

Latency: 4 KiB items over tcp, paced, producer-to-consumer one-way time on the shared monotonic
clock. Spray: 4 consumer groups of equal speed, then one group 2x faster than three others.

    python -m step_infra.rpc.bench [--quick] [--warmup N] [--rounds N] [--json PATH]

(``step-infra rpc bench`` and ``benchmarks/rpc_throughput.py`` run the same.) The child
processes of each path are in ``bench_paths.py``; the http and raw-zmq baselines need Flask and
msgpack (the ``[dev]`` extra): :func:`missing_requirements` says so before anything starts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from step_infra.rpc import bench_paths as paths
from step_infra.rpc.bench_paths import MIB, ROUND_TIMEOUT_S

PATHS = ("zmq", "tcp", "plain", "plain1", "shm", "http")  # every host; ucx where ucxx loads
# what the baselines import, and where it comes from
REQUIREMENTS = {"flask": "Flask (the pickle-over-HTTP baseline)", "msgpack": "msgpack (raw zmq)"}


def missing_requirements() -> list[str]:
    """What the benchmark needs and cannot find here (empty: it can run)."""
    return [why for mod, why in REQUIREMENTS.items() if importlib.util.find_spec(mod) is None]


def _lanes_default() -> int:
    """The tcp lanes StepRPC uses by default (what the plain-socket row matches)."""
    from step_infra.rpc.consumer import ConsumerConfig
    from step_infra.rpc.producer import ProducerConfig

    return min(ProducerConfig().lanes, ConsumerConfig().lanes)


# ------------------------------------------------------------------ the parent's side
@dataclass(slots=True)
class _Pair:
    """One path's producer and consumer processes, alive for all of its rounds."""

    kind: str
    address_q: Any  # held here too: a queue the parent drops is gone before a child opens it
    go_q: Any  # round numbers to the side that drives a round, then None
    result_q: Any  # (round, arrival times, item bytes, transport) from the consumer
    procs: list[Any]


def _start_pair(
    ctx: Any, kind: str, ready_q: Any, n: int, rounds: int, item_bytes: int, lanes: int
) -> _Pair:
    address_q, go_q, result_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
    cons: tuple[Callable[..., None], tuple[Any, ...]]  # (target, args) of each process
    prod: tuple[Callable[..., None], tuple[Any, ...]]
    if kind in ("plain", "plain1"):
        conns = lanes if kind == "plain" else 1
        cons = (paths.consume_plain, (address_q, result_q, n, rounds, item_bytes, conns))
        prod = (paths.produce_plain, (address_q, ready_q, go_q, n, item_bytes, conns))
    elif kind == "http":
        cons = (paths.consume_http, (address_q, ready_q, go_q, result_q, n))
        prod = (paths.produce_http, (address_q, item_bytes))
    elif kind == "zmq":  # the PULL side binds
        cons = (paths.consume_zmq, (address_q, result_q, n, rounds))
        prod = (paths.produce_zmq, (address_q, ready_q, go_q, n, item_bytes))
    else:
        bind = "ucx" if kind == "ucx" else "tcp"  # shm rides on a tcp producer
        cons = (paths.consume_rpc, (address_q, result_q, n, rounds, kind))
        prod = (paths.produce_rpc, (address_q, ready_q, go_q, n, item_bytes, bind))
    procs = [ctx.Process(target=t, args=a, name=f"{kind}-{t.__name__}") for t, a in (prod, cons)]
    for proc in procs:
        proc.start()
    return _Pair(kind=kind, address_q=address_q, go_q=go_q, result_q=result_q, procs=procs)


def _get(q: Any, pairs: list[_Pair], what: str) -> Any:
    """The next message on ``q``, or ``RuntimeError`` once a child died or time ran out."""
    deadline = time.monotonic() + ROUND_TIMEOUT_S
    while True:
        try:
            return q.get(timeout=1.0)
        except queue.Empty:
            dead = [p.name for pair in pairs for p in pair.procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{what}: nothing came (exited with an error: {dead})") from None


def _run_round(pair: _Pair, r: int) -> dict[str, Any]:
    """Round ``r`` of one path: go, then the consumer's arrival times of its ``n`` items."""
    pair.go_q.put(r)
    got, times, nbytes, used = _get(pair.result_q, [pair], f"{pair.kind} round {r}")
    assert got == r, (pair.kind, got, r)
    items_per_s = (len(times) - 1) / (times[-1] - times[0])
    return {
        "kind": pair.kind,
        "transport": used,
        "items": len(times),
        "item_bytes": nbytes,
        "items_per_s": items_per_s,
        "gib_per_s": items_per_s * nbytes / (1 << 30),
    }


def _stop_pair(pair: _Pair) -> None:
    pair.go_q.put(None)
    for proc in pair.procs:
        proc.join(30 if pair.kind != "http" else 0.5)  # the http server runs until stopped
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        if proc.is_alive():
            proc.kill()


def _throughput(
    kinds: list[str], n: int, item_bytes: int, lanes: int, warmup: int, rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[dict[str, Any]]]]:
    """Warm-up and counted rounds of every path, interleaved: round r of each path in turn,
    so load from other jobs on a shared host hits every path alike. Only the pair whose round
    it is moves bytes; the others wait idle (the rpc producers polling their links)."""
    ctx = mp.get_context("spawn")
    ready_q = ctx.Queue()
    pairs = [_start_pair(ctx, k, ready_q, n, warmup + rounds, item_bytes, lanes) for k in kinds]
    warm: dict[str, list[float]] = {k: [] for k in kinds}
    counted: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    try:
        for _ in pairs:  # every pair connected before any round, so no start-up load in one
            _get(ready_q, pairs, "connecting the pairs")
        for r in range(warmup + rounds):
            for pair in pairs:
                res = _run_round(pair, r)
                if r < warmup:
                    warm[pair.kind].append(round(res["gib_per_s"], 3))
                else:
                    counted[pair.kind].append(res)
    finally:
        for pair in pairs:
            _stop_pair(pair)
    return warm, counted


# ------------------------------------------------------------------ latency and spray (threads)
def _latency(n: int) -> dict[str, Any]:
    import torch

    from step_infra.rpc.consumer import Consumer, ConsumerConfig
    from step_infra.rpc.producer import Producer

    lat_us: list[float] = []
    with Producer("lat") as p:
        c = Consumer("lat", [p.address], group="g", config=ConsumerConfig(transport="tcp"))
        done = threading.Event()

        def run() -> None:
            while len(lat_us) < n:
                item = c.get(timeout_s=10)
                if item is None:
                    break
                lat_us.append((time.monotonic_ns() - item.metadata["t"]) / 1000)
            done.set()

        t = threading.Thread(target=run)
        t.start()
        p.wait_for_consumers()
        x = torch.zeros(1024, dtype=torch.float32)  # 4 KiB
        for _ in range(n + 20):
            if done.is_set():
                break
            p.send({"x": x}, {"t": time.monotonic_ns()})
            p.poll(1)  # pace: one item in flight, as a latency probe should
        t.join(30)
        c.close()
    lat_us = lat_us[20:]  # warm-up
    q = statistics.quantiles(lat_us, n=100)
    return {"items": len(lat_us), "p50_us": q[49], "p99_us": q[98]}


def _spray(delays_s: list[float], n: int) -> list[int]:
    import torch

    from step_infra.rpc.consumer import Consumer, ConsumerConfig
    from step_infra.rpc.producer import Producer

    counts = [0] * len(delays_s)
    stop = threading.Event()
    with Producer("spray") as p:
        cons = [
            Consumer("spray", [p.address], group=f"g{i}", config=ConsumerConfig(prefetch=1))
            for i in range(len(delays_s))
        ]

        def run(i: int) -> None:
            while not stop.is_set():
                if cons[i].get(timeout_s=0.1) is not None:
                    counts[i] += 1
                    time.sleep(delays_s[i])
            cons[i].close()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cons))]
        for t in threads:
            t.start()
        p.wait_for_consumers(groups=len(cons))
        for _ in range(n):
            p.send({"x": torch.zeros(16)})
        p.flush()
        stop.set()
        for t in threads:
            t.join(10)
    return counts


def run(
    *, items: int, item_mib: int, warmup: int, rounds: int, quick: bool, ucx_skipped: str | None
) -> dict[str, Any]:
    """Every measurement, as the ``--json`` file holds it (``ucx_skipped``: why there is no
    ucx row, ``None`` to run it)."""
    item_bytes = item_mib * MIB
    lanes = _lanes_default()
    kinds = [*PATHS, *(["ucx"] if ucx_skipped is None else [])]  # ucx: informational, no target
    warm, counted = _throughput(kinds, items, item_bytes, lanes, warmup, rounds)
    thr = {}
    for k, rs in counted.items():
        mid = sorted(rs, key=lambda r: r["items_per_s"])[len(rs) // 2]
        gib = [r["gib_per_s"] for r in rs]
        thr[k] = {
            **mid,
            "min_gib_per_s": min(gib),
            "max_gib_per_s": max(gib),
            "rounds_gib_per_s": [round(g, 3) for g in gib],
            "warmup_gib_per_s": warm[k],
        }
    # rounds are interleaved, so round i of tcp and of plain ran under the same load
    paired = [
        t["items_per_s"] / p["items_per_s"]
        for t, p in zip(counted["tcp"], counted["plain"], strict=True)
    ]
    lat = _latency(200 if quick else 1000)
    equal = _spray([0.004] * 4, 200 if quick else 400)
    fast = _spray([0.002, 0.004, 0.004, 0.004], 200 if quick else 400)
    fast_ratio = fast[0] / statistics.mean(fast[1:])
    ratios = {
        "tcp_vs_raw_zmq": thr["tcp"]["items_per_s"] / thr["zmq"]["items_per_s"],
        "tcp_vs_plain_socket": thr["tcp"]["items_per_s"] / thr["plain"]["items_per_s"],
        "tcp_vs_plain_socket_paired_median": statistics.median(paired),
        "tcp_vs_plain_1conn": thr["tcp"]["items_per_s"] / thr["plain1"]["items_per_s"],
        "shm_vs_tcp": thr["shm"]["items_per_s"] / thr["tcp"]["items_per_s"],
        "tcp_vs_pickle_http": thr["tcp"]["items_per_s"] / thr["http"]["items_per_s"],
        "shm_vs_pickle_http": thr["shm"]["items_per_s"] / thr["http"]["items_per_s"],
        "spray_equal_max_over_min": max(equal) / max(min(equal), 1),
        "spray_2x_group_ratio": fast_ratio,
    }
    targets = {
        "tcp_vs_raw_zmq": ratios["tcp_vs_raw_zmq"] >= 0.9,
        "tcp_vs_plain_socket": ratios["tcp_vs_plain_socket"] >= 0.9,
        "shm_vs_tcp": ratios["shm_vs_tcp"] >= 2.0,
        "vs_pickle_http": ratios["tcp_vs_pickle_http"] >= 5.0,
        "latency_p50_lt_200us": lat["p50_us"] < 200,
        "latency_p99_lt_1ms": lat["p99_us"] < 1000,
        "spray_equal_within_10pct": ratios["spray_equal_max_over_min"] <= 1.10,
        "spray_2x_in_1.6_2.4": 1.6 <= fast_ratio <= 2.4,
    }
    return {
        "throughput": thr,
        "latency_4k_tcp": lat,
        "spray_equal": equal,
        "spray_fast_first": fast,
        "ratios": ratios,
        "targets_met": targets,
        "cpus": os.cpu_count(),
        "quick": quick,
        "rounds": rounds,
        "warmup_rounds": warmup,
        "plain_socket_connections": lanes,
        "tcp_vs_plain_socket_rounds": [round(x, 3) for x in paired],
        "ucx_skipped": ucx_skipped,
    }


def report(out: dict[str, Any]) -> list[str]:
    """The table and ratios of :func:`run`'s results, one line each."""
    lines = [
        f"{'path':<8}{'items':>7}{'MiB/item':>10}{'items/s':>10}{'GiB/s':>8}{'min':>7}{'max':>7}"
    ]
    for r in out["throughput"].values():
        lines.append(
            f"{r['kind']:<8}{r['items']:>7}{r['item_bytes'] / MIB:>10.1f}"
            f"{r['items_per_s']:>10.2f}{r['gib_per_s']:>8.2f}"
            f"{r['min_gib_per_s']:>7.2f}{r['max_gib_per_s']:>7.2f}"
            f"   rounds {r['rounds_gib_per_s']} warm-up {r['warmup_gib_per_s']}"
        )
    lat = out["latency_4k_tcp"]
    lines += [
        f"plain: {out['plain_socket_connections']} connections (the lanes default); "
        "plain1: one connection",
        f"tcp/plain per round (same load): {out['tcp_vs_plain_socket_rounds']}",
        f"4 KiB tcp latency: p50 {lat['p50_us']:.0f} us, p99 {lat['p99_us']:.0f} us",
        f"spray equal groups: {out['spray_equal']}; 2x-fast group first: {out['spray_fast_first']}",
    ]
    lines += [f"{k:<36}{v:8.2f}" for k, v in out["ratios"].items()]
    lines += [f"{k:<36}{'PASS' if ok else 'MISS'}" for k, ok in out["targets_met"].items()]
    return lines


def main(argv: list[str] | None = None) -> int:
    """The command line: run, print the table, write ``--json``. Exit status 2 (and nothing
    started) when a baseline's package is missing."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    ap.add_argument("--quick", action="store_true", help="fewer items (smoke run)")
    ap.add_argument(
        "--items", type=int, default=None, help="items per round (default 16; 5 with --quick)"
    )
    ap.add_argument("--item-mib", type=int, default=64)
    ap.add_argument(
        "--rounds", type=int, default=None, help="counted rounds per path (median; default 5)"
    )
    ap.add_argument("--warmup", type=int, default=2, help="uncounted first rounds of every path")
    args = ap.parse_args(argv)
    if args.warmup < 0:
        raise ValueError(f"--warmup {args.warmup}; expected >= 0")
    missing = missing_requirements()
    if missing:
        print(
            f"the rpc benchmark's baselines need {', '.join(missing)}; install them with "
            "pip install 'step-infra[dev]' (or pip install flask msgpack)",
            file=sys.stderr,
        )
        return 2
    from step_infra.rpc.ucx import ucx_unavailable

    ucx_skipped = ucx_unavailable()
    if ucx_skipped is not None:
        print(f"ucx row skipped: {ucx_skipped}")
    rounds = args.rounds or (1 if args.quick else 5)
    out = run(
        items=args.items or (5 if args.quick else 16),
        item_mib=args.item_mib,
        warmup=args.warmup,
        rounds=rounds,
        quick=args.quick,
        ucx_skipped=ucx_skipped,
    )
    for line in report(out):
        print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
