"""``step-infra registry`` and ``step-infra rpc bench``.

Imported by the CLI at start-up, so it imports only typer/rich/stdlib here; grpc, zmq and
torch load inside the command bodies.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import typer
from rich.markup import escape

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
    from step_infra.rpc.registry import RegistryConfig, serve

    console = make_console()
    token = token or secrets.token_urlsafe(16)

    def listening(address: str) -> None:
        console.print(f"registry listening on {address}")
        console.print(f"token {token}  (clients: STEP_TOKEN={token})")
        sys.stdout.flush()

    config = RegistryConfig(host=host, port=port, token=token, lease_s=lease_s)
    serve(config, run_s=run_s, on_listening=listening)


@rpc_app.command()
def bench(
    json_path: str = typer.Option("", "--json", help="Write machine-readable results here."),
    quick: bool = typer.Option(False, help="Fewer items (smoke run)."),
) -> None:
    """Run the StepRPC benchmark (throughput, latency, spray balance): step_infra.rpc.bench.

    It runs as ``python -m step_infra.rpc.bench`` in a child process, so it works from an
    installed package and its worker processes start from a plain interpreter."""
    console = make_console()
    try:
        from step_infra.rpc.bench import missing_requirements
    except ImportError as exc:
        console.print(
            f"[red]the StepRPC benchmark module cannot be imported[/] ({escape(str(exc))}); "
            "reinstall step-infra (pip install --force-reinstall step-infra)"
        )
        raise typer.Exit(1) from exc
    missing = missing_requirements()
    if missing:
        console.print(
            f"[red]rpc bench needs {escape(', '.join(missing))}[/]: "
            + escape("pip install 'step-infra[dev]' (or pip install flask msgpack)")
        )
        raise typer.Exit(1)
    cmd = [sys.executable, "-m", "step_infra.rpc.bench"]
    if json_path:
        cmd += ["--json", json_path]
    if quick:
        cmd.append("--quick")
    raise typer.Exit(subprocess.call(cmd, env=dict(os.environ)))
