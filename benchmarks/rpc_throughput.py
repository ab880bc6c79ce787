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

    python benchmarks/rpc_throughput.py [--quick] [--warmup N] [--rounds N] [--json PATH]
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import multiprocessing as mp
import os
import pickle
import queue
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 1 << 20
ROUND_TIMEOUT_S = 300.0  # a child waiting longer for its peer or its next round gives up


def _payload(total_bytes: int) -> dict[str, Any]:
    import torch

    int_bytes = total_bytes // 16
    return {
        "latent": torch.randn((total_bytes - int_bytes) // 2).to(torch.bfloat16),
        "ids": torch.arange(int_bytes // 8, dtype=torch.int64),
    }


def _lanes_default() -> int:
    """The tcp lanes StepRPC uses by default (what the plain-socket row matches)."""
    from step_infra.rpc.consumer import ConsumerConfig
    from step_infra.rpc.producer import ProducerConfig

    return min(ProducerConfig().lanes, ConsumerConfig().lanes)


def _stripes(total: int, conns: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` byte ranges per connection, cut as ``LaneSender`` cuts."""
    part = -(-total // conns)
    part = -(-part // 4096) * 4096
    return [(i * part, min(total, (i + 1) * part)) for i in range(conns)]


# ------------------------------------------------------------------ child processes
# Every path runs as one producer process and one consumer process that live for all its
# rounds. The side that drives a round (the producer; the client for http) waits for the
# parent's go (the round number, ``None`` to stop) on ``go_q``; the consumer takes ``n`` items
# per round and puts ``(round, arrival times, item bytes, transport)`` on ``result_q``.
def _await_go(go_q: Any, idle: Callable[[], None] | None = None) -> int | None:
    """The parent's next round number (``None``: stop); ``idle`` runs while waiting."""
    while True:
        try:
            return go_q.get(timeout=0.05 if idle is not None else ROUND_TIMEOUT_S)
        except queue.Empty:
            if idle is None:
                raise
            idle()


def _consume_rpc(address_q: Any, result_q: Any, n: int, rounds: int, transport: str) -> None:
    from step_infra.rpc.consumer import Consumer, ConsumerConfig

    if transport == "ucx":
        os.environ.setdefault("UCX_TLS", "tcp")
    address = address_q.get(timeout=ROUND_TIMEOUT_S)
    c = Consumer("bench", [address], group="g", config=ConsumerConfig(transport=transport))
    for r in range(rounds):
        times = []
        nbytes = 0
        for _ in range(n):
            item = c.get(timeout_s=ROUND_TIMEOUT_S)  # waits (heartbeating) between rounds
            assert item is not None
            nbytes = item.nbytes
            times.append(time.monotonic())
        result_q.put((r, times, nbytes, c.transports[0]))
    c.close()


def _produce_rpc(
    address_q: Any, ready_q: Any, go_q: Any, n: int, item_bytes: int, bind: str
) -> None:
    from step_infra.rpc.producer import Producer, ProducerConfig

    payload = _payload(item_bytes)
    if bind == "ucx":
        os.environ.setdefault("UCX_TLS", "tcp")  # no RDMA device assumed: UCX over TCP
    cfg = ProducerConfig(transport=bind)  # the defaults: 512 MiB in flight, 4 lanes
    with Producer("bench", config=cfg) as p:
        address_q.put(p.address)
        p.wait_for_consumers(timeout_s=ROUND_TIMEOUT_S)
        ready_q.put(bind)
        while _await_go(go_q, idle=p.poll) is not None:  # poll: acks and leases stay fresh
            for i in range(n):
                p.send(payload, {"i": i})
        p.flush(timeout_s=60)


def _consume_zmq(address_q: Any, result_q: Any, n: int, rounds: int) -> None:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.setsockopt(zmq.LINGER, 0)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    address_q.put(f"tcp://127.0.0.1:{port}")
    for r in range(rounds):
        times = []
        nbytes = 0
        for _ in range(n):
            frames = s.recv_multipart(copy=False)
            nbytes = sum(len(f.buffer) for f in frames[1:])
            times.append(time.monotonic())
        result_q.put((r, times, nbytes, "zmq"))
    s.close()
    ctx.term()


def _produce_zmq(address_q: Any, ready_q: Any, go_q: Any, n: int, item_bytes: int) -> None:
    import msgpack
    import zmq

    from step_infra.rpc.wire import tensor_buffer

    payload = _payload(item_bytes)
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 4)
    s.connect(address_q.get(timeout=ROUND_TIMEOUT_S))
    head = msgpack.packb({"n": list(payload)})
    bufs = [tensor_buffer(t) for t in payload.values()]
    ready_q.put("zmq")
    while _await_go(go_q) is not None:
        for _ in range(n):
            s.send_multipart([head, *bufs], copy=False)
    s.close(linger=60_000)
    ctx.term()


def _consume_http(address_q: Any, ready_q: Any, go_q: Any, result_q: Any, n: int) -> None:
    address = address_q.get(timeout=ROUND_TIMEOUT_S)
    ready_q.put("http")
    while (r := _await_go(go_q)) is not None:  # the client drives: it asks for each item
        times: list[float] = []
        nbytes = 0
        for i in range(n):
            conn = http.client.HTTPConnection(address, timeout=120)  # a new session per call
            conn.request("GET", "/vae-api", body=pickle.dumps({"samples": i}))
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            if resp.status != 200:
                raise RuntimeError(f"baseline server answered {resp.status}: {body[:200]!r}")
            item = pickle.loads(body)  # the baseline's way; StepRPC never does this
            nbytes = sum(t.numel() * t.element_size() for t in item.values())
            times.append(time.monotonic())
        result_q.put((r, times, nbytes, "http"))


def _produce_http(address_q: Any, item_bytes: int) -> None:
    try:
        from flask import Flask, Response, request
        from werkzeug.serving import make_server
    except ImportError as exc:  # a dev dependency: pip install -e '.[dev]'
        msg = f"the pickle-over-HTTP baseline needs Flask ({exc}); pip install flask"
        raise SystemExit(msg) from exc

    payload = _payload(item_bytes)
    app = Flask("baseline")
    lock = threading.Lock()

    @app.route("/vae-api", methods=["GET"])
    def vae_api() -> Response:
        with lock:  # one request at a time, as in the authors' server
            feature = pickle.loads(request.get_data())
            feature["api"] = "vae"
            return Response(pickle.dumps(payload))

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per item
    server = make_server("127.0.0.1", 0, app, threaded=True)  # what app.run(threaded=True) runs
    address_q.put(f"127.0.0.1:{server.server_port}")
    server.serve_forever()  # until the parent terminates it


def _consume_plain(
    address_q: Any, result_q: Any, n: int, rounds: int, item_bytes: int, conns: int
) -> None:
    import numpy as np

    port = address_q.get(timeout=ROUND_TIMEOUT_S)
    socks = []
    for i in range(conns):
        sock = socket.create_connection(("127.0.0.1", port), timeout=ROUND_TIMEOUT_S)
        sock.sendall(bytes([i]))  # which stripe this connection carries
        socks.append(sock)
    buf = memoryview(np.empty(item_bytes, dtype=np.uint8))  # type: ignore[arg-type]
    done: list[queue.Queue[list[float]]] = [queue.Queue() for _ in socks]

    def run(i: int) -> None:
        start, stop = _stripes(item_bytes, conns)[i]
        view = buf[start:stop]
        for _ in range(rounds):
            times = []
            for _ in range(n):
                got = 0
                while got < view.nbytes:
                    k = socks[i].recv_into(view[got:], view.nbytes - got, socket.MSG_WAITALL)
                    if k == 0:
                        raise ConnectionError("plain socket closed by the producer")
                    got += k
                times.append(time.monotonic())
            done[i].put(times)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(conns)]
    for t in threads:
        t.start()
    for r in range(rounds):
        per_conn = [d.get(timeout=ROUND_TIMEOUT_S) for d in done]
        times = [max(ts) for ts in zip(*per_conn, strict=True)]  # in once every stripe is
        result_q.put((r, times, item_bytes, f"plain x{conns}"))
    for sock in socks:
        sock.close()


def _produce_plain(
    address_q: Any, ready_q: Any, go_q: Any, n: int, item_bytes: int, conns: int
) -> None:
    from step_infra.rpc.wire import tensor_buffer

    payload = _payload(item_bytes)
    bufs = [tensor_buffer(t) for t in payload.values()]  # 64-byte multiples: flat offsets
    offsets = [sum(b.nbytes for b in bufs[:i]) for i in range(len(bufs))]
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(ROUND_TIMEOUT_S)
    address_q.put(server.getsockname()[1])
    socks: list[socket.socket | None] = [None] * conns
    for _ in range(conns):
        sock, _ = server.accept()
        sock.settimeout(None)
        socks[sock.recv(1)[0]] = sock
    server.close()
    gos: list[queue.Queue[int | None]] = [queue.Queue() for _ in socks]

    def run(i: int) -> None:
        sock = socks[i]
        assert sock is not None
        start, stop = _stripes(item_bytes, conns)[i]
        views = [  # this stripe's pieces of the tensor buffers
            b[max(start - off, 0) : min(stop - off, b.nbytes)]
            for off, b in zip(offsets, bufs, strict=True)
            if off < stop and start < off + b.nbytes
        ]
        while gos[i].get() is not None:
            for _ in range(n):
                for v in views:
                    sock.sendall(v)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    ready_q.put(f"plain x{conns}")
    while True:
        r = _await_go(go_q)
        for g in gos:
            g.put(r)
        if r is None:
            break
    for t in threads:
        t.join()
    for conn in socks:
        if conn is not None:
            conn.close()


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
        cons = (_consume_plain, (address_q, result_q, n, rounds, item_bytes, conns))
        prod = (_produce_plain, (address_q, ready_q, go_q, n, item_bytes, conns))
    elif kind == "http":
        cons = (_consume_http, (address_q, ready_q, go_q, result_q, n))
        prod = (_produce_http, (address_q, item_bytes))
    elif kind == "zmq":  # the PULL side binds
        cons = (_consume_zmq, (address_q, result_q, n, rounds))
        prod = (_produce_zmq, (address_q, ready_q, go_q, n, item_bytes))
    else:
        bind = "ucx" if kind == "ucx" else "tcp"  # shm rides on a tcp producer
        cons = (_consume_rpc, (address_q, result_q, n, rounds, kind))
        prod = (_produce_rpc, (address_q, ready_q, go_q, n, item_bytes, bind))
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    n = args.items or (5 if args.quick else 16)
    args.rounds = args.rounds or (1 if args.quick else 5)
    item_bytes = args.item_mib * MIB
    lanes = _lanes_default()
    from step_infra.rpc.ucx import ucx_unavailable

    kinds = ["zmq", "tcp", "plain", "plain1", "shm", "http"]
    ucx_skipped = ucx_unavailable()
    if ucx_skipped is None:  # informational row, no target: UCX over TCP on this host
        kinds.append("ucx")
    else:
        print(f"ucx row skipped: {ucx_skipped}")
    warm, rounds = _throughput(kinds, n, item_bytes, lanes, args.warmup, args.rounds)
    thr = {}
    for k, rs in rounds.items():
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
        for t, p in zip(rounds["tcp"], rounds["plain"], strict=True)
    ]
    lat = _latency(200 if args.quick else 1000)
    equal = _spray([0.004] * 4, 200 if args.quick else 400)
    fast = _spray([0.002, 0.004, 0.004, 0.004], 200 if args.quick else 400)
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
    print(f"{'path':<8}{'items':>7}{'MiB/item':>10}{'items/s':>10}{'GiB/s':>8}{'min':>7}{'max':>7}")
    for r in thr.values():
        print(
            f"{r['kind']:<8}{r['items']:>7}{r['item_bytes'] / MIB:>10.1f}"
            f"{r['items_per_s']:>10.2f}{r['gib_per_s']:>8.2f}"
            f"{r['min_gib_per_s']:>7.2f}{r['max_gib_per_s']:>7.2f}"
            f"   rounds {r['rounds_gib_per_s']} warm-up {r['warmup_gib_per_s']}"
        )
    print(f"plain: {lanes} connections (the lanes default); plain1: one connection")
    print(f"tcp/plain per round (same load): {[round(x, 3) for x in paired]}")
    print(f"4 KiB tcp latency: p50 {lat['p50_us']:.0f} us, p99 {lat['p99_us']:.0f} us")
    print(f"spray equal groups: {equal}; 2x-fast group first: {fast}")
    for k, v in ratios.items():
        print(f"{k:<36}{v:8.2f}")
    for k, ok in targets.items():
        print(f"{k:<36}{'PASS' if ok else 'MISS'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {
            "throughput": thr,
            "latency_4k_tcp": lat,
            "spray_equal": equal,
            "spray_fast_first": fast,
            "ratios": ratios,
            "targets_met": targets,
            "cpus": os.cpu_count(),
            "quick": args.quick,
            "rounds": args.rounds,
            "warmup_rounds": args.warmup,
            "plain_socket_connections": lanes,
            "tcp_vs_plain_socket_rounds": [round(x, 3) for x in paired],
            "ucx_skipped": ucx_skipped,
        }
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
