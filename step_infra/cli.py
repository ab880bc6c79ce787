"""The ``step-infra`` command line: one sub-command per system.

Sub-commands import their system lazily inside the command body, so ``step-infra --help``
stays fast and never imports torch.
"""

from __future__ import annotations

import typer
from rich.table import Table

from step_infra import __version__
from step_infra.console import make_console

app = typer.Typer(
    name="step-infra",
    help="Training infrastructure for large video diffusion transformers "
    "(Step Emulator, StepRPC, StepTelemetry).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"step-infra {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        help="Print the version and exit.",
        callback=_version_callback,
        is_eager=True,
    ),
) -> None:
    """Training infrastructure for large video diffusion transformers."""


@app.command()
def doctor() -> None:
    """Report the installed stack and devices; exits 1 if a required component is missing."""
    from step_infra.doctor import probe_environment

    console = make_console()
    table = Table(title=f"step-infra {__version__}: environment")
    table.add_column("component")
    table.add_column("status")
    table.add_column("detail")
    missing = []
    for probe in probe_environment():
        status = (
            "[green]ok[/]"
            if probe.ok
            else ("[red]missing[/]" if probe.required else "[yellow]absent[/]")
        )
        table.add_row(probe.name, status, probe.detail)
        if probe.required and not probe.ok:
            missing.append(probe.name)
    console.print(table)
    if missing:
        console.print(
            f"[red]required components missing: {', '.join(missing)}[/] (run `make venv`)"
        )
        raise typer.Exit(1)


@app.command()
def demo(
    run_dir: str = typer.Option("runs/demo", help="Where the demo writes its outputs."),
) -> None:
    """Run the main job end to end on embedded defaults and print where the outputs went."""
    from step_infra.demo import DemoStageError, run_demo

    console = make_console()
    try:
        run_demo(run_dir, console=console)
    except DemoStageError as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        raise typer.Exit(1) from exc


# Each system's sub-commands live in its own package; those modules import only typer/rich.
from step_infra.demo.cli import telemetry_demo as _telemetry_demo  # noqa: E402
from step_infra.emulator.calibrate_cmd import calibrate as _calibrate  # noqa: E402
from step_infra.emulator.cli import plan as _plan  # noqa: E402
from step_infra.recipes.cli import recipe as _recipe  # noqa: E402
from step_infra.telemetry.cli import dashboard as _telemetry_dashboard  # noqa: E402
from step_infra.train.cli import train as _train  # noqa: E402

app.command(name="calibrate")(_calibrate)
app.command(name="plan")(_plan)
app.command(name="recipe")(_recipe)

from step_infra.rpc.cli import registry as _registry  # noqa: E402
from step_infra.rpc.cli import rpc_app as _rpc_app  # noqa: E402

app.command(name="registry")(_registry)
app.add_typer(_rpc_app, name="rpc")
app.command(name="dashboard")(_telemetry_dashboard)
app.command(name="telemetry-demo")(_telemetry_demo)
app.command(name="train")(_train)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
