"""The child processes of ``step_infra.rpc.bench``: one producer and one consumer per path.

Every path of the throughput benchmark (raw pyzmq, StepRPC over tcp, shm or ucx, plain
sockets, the authors' pickle over HTTP) runs as one producer process and one consumer process
that live for all of its rounds, so connections, lanes and receive buffers are set up once, as
in a long-lived pipe. The side that drives a round (the producer; the client for http) waits
for the parent's go (the round number, ``None`` to stop) on ``go_q``; the consumer takes ``n``
items per round and puts ``(round, arrival times, item bytes, transport)`` on ``result_q``.
They live in their own module, importable from an installed package, because the parent
starts them with multiprocessing's ``spawn`` (each child imports its target by name).
"""

from __future__ import annotations

import http.client
import logging
import os
import pickle
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

MIB = 1 << 20
ROUND_TIMEOUT_S = 300.0  # a child waiting longer for its peer or its next round gives up


def make_payload(total_bytes: int) -> dict[str, Any]:
    """One item of about ``total_bytes``: a bf16 latent (15/16) and int64 ids (1/16)."""
    import torch

    int_bytes = total_bytes // 16
    return {
        "latent": torch.randn((total_bytes - int_bytes) // 2).to(torch.bfloat16),
        "ids": torch.arange(int_bytes // 8, dtype=torch.int64),
    }


def stripes(total: int, conns: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` byte ranges per connection, cut as ``LaneSender`` cuts."""
    part = -(-total // conns)
    part = -(-part // 4096) * 4096
    return [(i * part, min(total, (i + 1) * part)) for i in range(conns)]


# ------------------------------------------------------------------ child processes
def await_go(go_q: Any, idle: Callable[[], None] | None = None) -> int | None:
    """The parent's next round number (``None``: stop); ``idle`` runs while waiting."""
    while True:
        try:
            return go_q.get(timeout=0.05 if idle is not None else ROUND_TIMEOUT_S)
        except queue.Empty:
            if idle is None:
                raise
            idle()


def consume_rpc(address_q: Any, result_q: Any, n: int, rounds: int, transport: str) -> None:
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


def produce_rpc(
    address_q: Any, ready_q: Any, go_q: Any, n: int, item_bytes: int, bind: str
) -> None:
    from step_infra.rpc.producer import Producer, ProducerConfig

    payload = make_payload(item_bytes)
    if bind == "ucx":
        os.environ.setdefault("UCX_TLS", "tcp")  # no RDMA device assumed: UCX over TCP
    cfg = ProducerConfig(transport=bind)  # the defaults: 512 MiB in flight, 4 lanes
    with Producer("bench", config=cfg) as p:
        address_q.put(p.address)
        p.wait_for_consumers(timeout_s=ROUND_TIMEOUT_S)
        ready_q.put(bind)
        while await_go(go_q, idle=p.poll) is not None:  # poll: acks and leases stay fresh
            for i in range(n):
                p.send(payload, {"i": i})
        p.flush(timeout_s=60)


def consume_zmq(address_q: Any, result_q: Any, n: int, rounds: int) -> None:
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


def produce_zmq(address_q: Any, ready_q: Any, go_q: Any, n: int, item_bytes: int) -> None:
    import msgpack
    import zmq

    from step_infra.rpc.wire import tensor_buffer

    payload = make_payload(item_bytes)
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 4)
    s.connect(address_q.get(timeout=ROUND_TIMEOUT_S))
    head = msgpack.packb({"n": list(payload)})
    bufs = [tensor_buffer(t) for t in payload.values()]
    ready_q.put("zmq")
    while await_go(go_q) is not None:
        for _ in range(n):
            s.send_multipart([head, *bufs], copy=False)
    s.close(linger=60_000)
    ctx.term()


def consume_http(address_q: Any, ready_q: Any, go_q: Any, result_q: Any, n: int) -> None:
    address = address_q.get(timeout=ROUND_TIMEOUT_S)
    ready_q.put("http")
    while (r := await_go(go_q)) is not None:  # the client drives: it asks for each item
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


def produce_http(address_q: Any, item_bytes: int) -> None:
    try:
        from flask import Flask, Response, request
        from werkzeug.serving import make_server
    except ImportError as exc:  # a dev dependency: pip install -e '.[dev]'
        msg = f"the pickle-over-HTTP baseline needs Flask ({exc}); pip install flask"
        raise SystemExit(msg) from exc

    payload = make_payload(item_bytes)
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


def consume_plain(
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
        start, stop = stripes(item_bytes, conns)[i]
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


def produce_plain(
    address_q: Any, ready_q: Any, go_q: Any, n: int, item_bytes: int, conns: int
) -> None:
    from step_infra.rpc.wire import tensor_buffer

    payload = make_payload(item_bytes)
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
        start, stop = stripes(item_bytes, conns)[i]
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
        r = await_go(go_q)
        for g in gos:
            g.put(r)
        if r is None:
            break
    for t in threads:
        t.join()
    for conn in socks:
        if conn is not None:
            conn.close()
