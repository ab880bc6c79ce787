"""``step-infra registry`` and ``step-infra rpc bench``.

Imported by the CLI at start-up, so it imports only typer/rich/stdlib here; grpc, zmq and
torch load inside the command bodies.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import typer

from step_infra.console import make_console

rpc_app = typer.Typer(help="StepRPC tools.", no_args_is_help=True)


def registry(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(0, help="Port (0: a free one)."),
    token: str = typer.Option(
        "", envvar="STEP_TOKEN", help="Job token clients must send (default: a random one)."
    ),
    lease_s: float = typer.Option(10.0, help="Lease of producers and consumers, seconds."),
    run_s: float = typer.Option(0.0, help="Stop after this many seconds (0: run until Ctrl-C)."),
) -> None:
    """Run the StepRPC registry (gRPC) and print its address and token."""
    from step_infra.rpc.registry import Registry, RegistryConfig

    console = make_console()
    token = token or secrets.token_urlsafe(16)
    reg = Registry(RegistryConfig(host=host, port=port, token=token, lease_s=lease_s))
    console.print(f"registry listening on {reg.address}")
    console.print(f"token {token}  (clients: STEP_TOKEN={token})")
    sys.stdout.flush()
    try:
        if run_s > 0:
            time.sleep(run_s)
        else:
            reg.wait()
    except KeyboardInterrupt:
        pass
    finally:
        reg.stop()


@rpc_app.command()
def bench(
    json_path: str = typer.Option("", "--json", help="Write machine-readable results here."),
    quick: bool = typer.Option(False, help="Fewer items (smoke run)."),
) -> None:
    """Run benchmarks/rpc_throughput.py (throughput, latency, spray balance)."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "rpc_throughput.py"
    if not script.exists():
        make_console().print(f"[red]benchmark script not found:[/] {script}")
        raise typer.Exit(1)
    cmd = [sys.executable, str(script)]
    if json_path:
        cmd += ["--json", json_path]
    if quick:
        cmd.append("--quick")
    raise typer.Exit(subprocess.call(cmd, env=dict(os.environ)))
