"""The StepRPC control plane: a gRPC registry of pipes, producers and consumers.

It only tells endpoints about each other; items never pass through it, so data keeps
flowing while it restarts. Producers and consumers hold leases renewed by heartbeats; a
heartbeat the registry does not recognise (it restarted, or the lease expired) answers
``known=False`` and the client registers again. Every call must carry the job token in the
``x-step-token`` metadata; calls without it are refused with ``UNAUTHENTICATED``.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from step_infra.rpc import registry_pb2 as pb
from step_infra.rpc import registry_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

TOKEN_KEY = "x-step-token"


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryConfig:
    """Where the registry listens and how long leases last."""

    host: str = "127.0.0.1"
    port: int = 0
    token: str
    lease_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError("token is empty; expected a job token (e.g. --token $STEP_TOKEN)")
        if self.lease_s <= 0:
            raise ValueError(f"lease_s {self.lease_s}; expected > 0")


class _Service(pb_grpc.RegistryServicer):
    def __init__(self, config: RegistryConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._pipes: dict[str, str] = {}
        self._endpoints: dict[tuple[str, str, str], tuple[pb.Endpoint, float]] = {}
        self._epoch = 0

    def _auth(self, context: grpc.ServicerContext) -> None:
        md = dict(context.invocation_metadata())
        token = md.get(TOKEN_KEY, "")
        if not isinstance(token, str) or not hmac.compare_digest(token, self._config.token):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong job token")

    def _expire(self) -> None:
        now = time.monotonic()
        dead = [k for k, (_, t) in self._endpoints.items() if now - t > self._config.lease_s]
        for k in dead:
            log.warning("registry: lease of %s expired", k)
            del self._endpoints[k]
            self._epoch += 1

    def _lease(self, known: bool) -> pb.Lease:
        return pb.Lease(known=known, lease_s=self._config.lease_s, epoch=self._epoch)

    def CreatePipe(self, request: pb.Pipe, context: grpc.ServicerContext) -> pb.Pipe:
        self._auth(context)
        if request.mode not in ("spray", "broadcast"):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"mode {request.mode!r}; expected 'spray' or 'broadcast'",
            )
        with self._lock:
            mode = self._pipes.setdefault(request.name, request.mode)
        return pb.Pipe(name=request.name, mode=mode)

    def LookupPipe(self, request: pb.PipeRequest, context: grpc.ServicerContext) -> pb.PipeInfo:
        self._auth(context)
        with self._lock:
            self._expire()
            if request.name not in self._pipes:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no pipe {request.name!r}")
            eps = [e for (p, _, _), (e, _) in self._endpoints.items() if p == request.name]
            return pb.PipeInfo(
                pipe=pb.Pipe(name=request.name, mode=self._pipes[request.name]),
                producers=[e for e in eps if e.role == "producer"],
                consumers=[e for e in eps if e.role == "consumer"],
                epoch=self._epoch,
            )

    def ListPipes(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.PipeList:
        self._auth(context)
        with self._lock:
            return pb.PipeList(pipes=[pb.Pipe(name=n, mode=m) for n, m in self._pipes.items()])

    def Register(self, request: pb.Endpoint, context: grpc.ServicerContext) -> pb.Lease:
        self._auth(context)
        if request.role not in ("producer", "consumer"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"role {request.role!r}")
        with self._lock:
            self._pipes.setdefault(request.pipe, "spray")
            self._endpoints[_key(request)] = (request, time.monotonic())
            self._epoch += 1
            return self._lease(True)

    def Heartbeat(self, request: pb.Endpoint, context: grpc.ServicerContext) -> pb.Lease:
        self._auth(context)
        with self._lock:
            self._expire()
            key = _key(request)
            if key not in self._endpoints:
                return self._lease(False)
            self._endpoints[key] = (self._endpoints[key][0], time.monotonic())
            return self._lease(True)

    def Deregister(self, request: pb.Endpoint, context: grpc.ServicerContext) -> pb.Lease:
        self._auth(context)
        with self._lock:
            known = self._endpoints.pop(_key(request), None) is not None
            self._epoch += known
            return self._lease(known)


def _key(ep: pb.Endpoint) -> tuple[str, str, str]:
    return (ep.pipe, ep.role, f"{ep.group}/{ep.name}")


class Registry:
    """A running registry server; ``address`` is ``host:port``."""

    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_RegistryServicer_to_server(_Service(config), self._server)
        port = self._server.add_insecure_port(f"{config.host}:{config.port}")
        if port == 0:
            raise ValueError(f"cannot bind the registry to {config.host}:{config.port}")
        self.address = f"{config.host}:{port}"
        self._server.start()

    def stop(self, grace_s: float = 0.0) -> None:
        """Stop serving."""
        self._server.stop(grace_s).wait()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the server stops (or ``timeout_s``)."""
        return bool(self._server.wait_for_termination(timeout_s))

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RegistryClient:
    """Calls the registry with the job token; re-registers when a heartbeat is not known."""

    def __init__(self, address: str, token: str, *, timeout_s: float = 5.0) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.RegistryStub(self._channel)
        self._md = ((TOKEN_KEY, token),) if token else ()
        self.token = token  # the job token; producers and consumers prove it on data links
        self._timeout = timeout_s
        self._registered: dict[tuple[str, str, str], pb.Endpoint] = {}
        self._last_beat = time.monotonic()

    def _call(self, method: str, request: Any) -> Any:
        return getattr(self._stub, method)(request, metadata=self._md, timeout=self._timeout)

    def create_pipe(self, name: str, mode: str = "spray") -> str:
        """Create (or look up) pipe ``name``; returns its mode."""
        return str(self._call("CreatePipe", pb.Pipe(name=name, mode=mode)).mode)

    def lookup(self, name: str) -> pb.PipeInfo:
        """The pipe's mode and live producers and consumers."""
        return self._call("LookupPipe", pb.PipeRequest(name=name))

    def producer_addresses(self, name: str) -> list[str]:
        """Addresses of the pipe's live producers."""
        return [e.address for e in self.lookup(name).producers]

    def register(
        self, *, pipe: str, role: str, name: str, group: str = "", address: str = ""
    ) -> pb.Lease:
        """Register an endpoint (kept for re-registration after a registry restart)."""
        ep = pb.Endpoint(pipe=pipe, role=role, name=name, group=group, address=address)
        self._registered[_key(ep)] = ep
        return self._call("Register", ep)

    def heartbeat(self) -> int:
        """Renew every registered lease; re-register unknown ones. Returns re-registrations."""
        again = 0
        for ep in list(self._registered.values()):
            if not self._call("Heartbeat", ep).known:
                self._call("Register", ep)
                again += 1
        return again

    def keep_alive(self, interval_s: float = 1.0) -> None:
        """Heartbeat at most every ``interval_s``; a registry that is down is logged, not
        raised, so the data plane never stops because of the control plane."""
        now = time.monotonic()
        if now - self._last_beat < interval_s:
            return
        self._last_beat = now
        try:
            if self.heartbeat():
                log.info("re-registered with the registry (it restarted or our lease lapsed)")
        except grpc.RpcError as exc:
            log.warning("registry unreachable (%s); data keeps flowing", exc.code())

    def deregister_all(self) -> None:
        """Drop every lease this client holds."""
        for ep in list(self._registered.values()):
            self._call("Deregister", ep)
        self._registered.clear()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()


def serve(
    config: RegistryConfig,
    *,
    run_s: float = 0.0,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Run a registry until ``run_s`` seconds passed (0: until stopped or Ctrl-C);
    ``on_listening`` gets its address once it accepts connections."""
    reg = Registry(config)
    log.info("registry listening on %s", reg.address)
    if on_listening is not None:
        on_listening(reg.address)
    try:
        if run_s > 0:
            time.sleep(run_s)
        else:
            reg.wait()
    except KeyboardInterrupt:
        pass
    finally:
        reg.stop()


def main(argv: list[str] | None = None) -> None:
    """``python -m step_infra.rpc.registry``: what a launcher starts (token from STEP_TOKEN)."""
    import argparse
    import os

    from step_infra.rpc.auth import TOKEN_ENV

    ap = argparse.ArgumentParser(description="the StepRPC registry (gRPC)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--lease-s", type=float, default=10.0)
    ap.add_argument("--run-s", type=float, default=0.0, help="stop after this long (0: never)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise SystemExit(
            f"{TOKEN_ENV} is not set: the registry admits only clients with the job token"
        )
    config = RegistryConfig(host=args.host, port=args.port, token=token, lease_s=args.lease_s)
    serve(config, run_s=args.run_s)


if __name__ == "__main__":
    main()
