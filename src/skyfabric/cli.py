"""The ``skyfabric`` command line: verbs named for what a person does."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import ClassVar

import click

from skyfabric.control import EMBEDDED_FLEET as DEFAULT_FLEET
from skyfabric.core.errors import ConfigError


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class LazyGroup(click.Group):
    """Loads heavy commands (the engine's, which import PyTorch) only when they are run."""

    lazy: ClassVar[dict[str, str]] = {
        "replica": "skyfabric.engine.replica:replica_command",
        "grow": "skyfabric.engine.grow:grow_command",
        "drill": "skyfabric.drills.cli:drill_command",
        "plan": "skyfabric.control.cli:plan_command",
        "launch-spec": "skyfabric.control.cli:launch_spec_command",
        "simulate": "skyfabric.sim.cli:simulate_command",
        "keys": "skyfabric.control.keys_cli:keys_command",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module, _, attr = self.lazy[cmd_name].partition(":")
            command: click.Command = getattr(importlib.import_module(module), attr)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup)
@click.option("--log-level", default="warning", show_default=True, help="debug, info, warning or error")
def cli(log_level: str) -> None:
    """skyfabric: one OpenAI-compatible endpoint in front of a fleet that survives losing a cloud."""
    _setup_logging(log_level)


def _load(path: Path):  # type: ignore[no-untyped-def]
    from skyfabric.core.fleet import load_fleet

    try:
        return load_fleet(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command()
@click.option("--config", "config", type=click.Path(path_type=Path), default=DEFAULT_FLEET, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True)
@click.option("--replica-base-port", default=8100, show_default=True, help="first port for local replicas")
@click.option("--workers", default=1, show_default=True, help="gateway processes (SO_REUSEPORT)")
def up(config: Path, host: str, port: int, replica_base_port: int, workers: int) -> None:
    """Start the embedded fleet (local replicas as child processes) and the gateway in front of it."""
    from skyfabric.control.supervisor import run_embedded

    sys.exit(run_embedded(_load(config), host, port, replica_base_port, workers))


@cli.command()
@click.option("--config", "config", type=click.Path(path_type=Path), required=True, help="fleet file (YAML)")
@click.option("--host", default=None, help="default: the fleet file's listener.host")
@click.option("--port", default=None, type=int, help="default: the fleet file's listener.port")
@click.option("--workers", default=1, show_default=True, help="processes sharing the port (SO_REUSEPORT)")
def serve(config: Path, host: str | None, port: int | None, workers: int) -> None:
    """Run the gateway for a fleet file whose pools all have endpoints."""
    from skyfabric.core.endpoints import fleet_endpoints
    from skyfabric.gateway.serve import run

    fleet = _load(config)
    try:
        fleet_endpoints(fleet)
    except ConfigError as exc:
        raise click.ClickException(f"{config}: {exc}") from None
    port = port if port is not None else fleet.listener.port
    run(fleet, host or fleet.listener.host, port, workers, fleet_path=str(config))


@cli.command()
@click.option("--url", default="http://127.0.0.1:8080", show_default=True, help="the gateway")
@click.option(
    "--key", envvar="SKYFABRIC_API_KEY", default=None, help="an API key of the fleet (or $SKYFABRIC_API_KEY)"
)
@click.option("--interval", default=1.0, show_default=True, help="seconds between refreshes")
@click.option("--once", is_flag=True, help="print one picture and exit")
def status(url: str, key: str | None, interval: float, once: bool) -> None:
    """The fleet as the gateway sees it, refreshing: health, ejection causes, figures, incidents."""
    from skyfabric.control.status import run as run_status

    sys.exit(run_status(url, key, interval, once))


@cli.command()
@click.option("--config", "config", type=click.Path(path_type=Path), default=DEFAULT_FLEET, show_default=True)
@click.option(
    "--since", default="24h", show_default=True, help="now, a duration ago (24h, 7d) or an ISO date"
)
@click.option("--until", default="now", show_default=True, help="now, a duration ago or an ISO date")
@click.option("--by", type=click.Choice(["key", "model", "provider"]), default="model", show_default=True)
@click.option(
    "--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True
)
def usage(config: Path, since: str, until: str, by: str, fmt: str) -> None:
    """Spend and tokens over a period from the usage ledger, by API key, model or provider."""
    from skyfabric.ops.database import Database
    from skyfabric.ops.report import parse_when, render, usage_rows

    operations = _load(config).operations
    if operations is None:
        raise click.ClickException(f"{config} has no `operations` section: no usage ledger")
    try:
        rows = usage_rows(Database.of(operations, config), parse_when(since), parse_when(until), by)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(render(rows, by, fmt), nl=False)


def main() -> None:
    """Entry point of the ``skyfabric`` script."""
    cli()


if __name__ == "__main__":
    main()
