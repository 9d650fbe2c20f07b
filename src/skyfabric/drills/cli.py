"""``skyfabric drill``: run a scenario against a fleet, print the report, exit non-zero on a missed SLO."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import sys
from importlib import resources
from pathlib import Path
from typing import NoReturn

import click

from skyfabric.core.errors import ConfigError, SkyfabricError
from skyfabric.core.fleet import load_fleet
from skyfabric.drills.scenario import Scenario, builtin_scenarios, load_scenario
from skyfabric.drills.trace import load_trace

#: Exit statuses: the SLO was met, missed, or the drill could not run at all.
EXIT_PASSED, EXIT_MISSED, EXIT_BROKEN = 0, 1, 2


def default_fleet() -> Path:
    """The embedded fleet file (``skyfabric.cli.DEFAULT_FLEET``; found here without importing the CLI, which
    sits above the drills in the import order)."""
    return Path(str(resources.files("skyfabric.control") / "fleets" / "embedded.yaml"))


def with_trace(spec: Scenario, trace: Path) -> Scenario:
    """``spec`` replaying the trace at ``trace`` (checked now, before any process starts)."""
    if spec.workload.kind != "trace":
        raise ConfigError(
            f"--trace replays a trace, but scenario {spec.name!r} has a {spec.workload.kind} workload"
            " (use a scenario with `workload: {kind: trace}`, e.g. trace-outage)"
        )
    load_trace(trace)
    return spec.model_copy(update={"workload": spec.workload.model_copy(update={"trace": str(trace)})})


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    # Turn SIGTERM into the same orderly shutdown as Ctrl-C: every child process is stopped.
    raise KeyboardInterrupt


@click.command(
    "drill",
    epilog="Built-in scenarios: " + ", ".join(builtin_scenarios()) + ". See docs/drills.md.",
)
@click.argument("scenario")
@click.option(
    "--config",
    "config",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="fleet file  [default: the embedded fleet]",
)
@click.option("--provider", default=None, help="the provider the faults hit (fills or overrides targets)")
@click.option("--region", default=None, help="narrow the faults to this region")
@click.option("--duration", type=click.FloatRange(min=1.0), default=None, help="seconds of workload")
@click.option(
    "--speed", type=click.FloatRange(min=0.001), default=1.0, show_default=True, help="time compression"
)
@click.option(
    "--trace",
    "trace",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="CSV (TIMESTAMP,ContextTokens,GeneratedTokens) a trace scenario replays  [default: the scenario's,"
    " else 15 minutes of the Azure conversation trace shipped with skyfabric]",
)
@click.option("--baseline", is_flag=True, help="also run with failover off and compare")
@click.option(
    "--out", "out", type=click.Path(path_type=Path, file_okay=False), default=None, help="output dir"
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--replica-timeout", type=float, default=300.0, show_default=True, help="seconds to start replicas"
)
def drill_command(
    scenario: str,
    config: Path | None,
    provider: str | None,
    region: str | None,
    duration: float | None,
    speed: float,
    trace: Path | None,
    baseline: bool,
    out: Path | None,
    seed: int,
    replica_timeout: float,
) -> None:
    """Run the drill SCENARIO (a built-in name or a YAML file) through the real gateway.

    Faults are injected between the gateway and every endpoint by the drill's proxies; the report (JSON,
    Markdown, PNG timeline) lands in --out and is printed. Exit status: 0 SLO met, 1 missed, 2 not run.
    """
    from skyfabric.drills.plot import plot_timeline
    from skyfabric.drills.report import build_report, render_markdown, write_json
    from skyfabric.drills.runner import DrillOptions, run_drill

    fleet_path = config or default_fleet()
    try:
        spec = load_scenario(scenario)
        fleet = load_fleet(fleet_path)
        if trace is not None:
            spec = with_trace(spec, trace)
    except ConfigError as exc:
        click.echo(f"skyfabric drill: {exc}", err=True)
        sys.exit(EXIT_BROKEN)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = out or Path("out") / "drills" / f"{spec.name}-{stamp}"
    options = DrillOptions(
        scenario=spec,
        fleet=fleet,
        fleet_path=fleet_path,
        out_dir=out_dir,
        provider=provider,
        region=region,
        duration=duration,
        speed=speed,
        baseline=baseline,
        seed=seed,
        replica_timeout=replica_timeout,
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    click.echo(f"drill {spec.name}: {options.seconds:g}s of workload; output in {out_dir}", err=True)
    try:
        run = asyncio.run(run_drill(options))
    except (ConfigError, SkyfabricError) as exc:
        click.echo(f"skyfabric drill: {exc}", err=True)
        sys.exit(EXIT_BROKEN)
    except KeyboardInterrupt:
        click.echo("skyfabric drill: interrupted; every process it started was stopped", err=True)
        sys.exit(130)
    files = {"json": str(out_dir / "report.json"), "markdown": str(out_dir / "report.md")}
    files["plot"] = str(
        plot_timeline(
            run.main.records,
            run.spans,
            run.main.proxy_events,
            out_dir / "timeline.png",
            title=f"drill {spec.name}: skyfabric",
            ended=run.main.ended,
            stalls=run.main.stalls(),
        )
    )
    if run.baseline is not None:
        files["baseline_plot"] = str(
            plot_timeline(
                run.baseline.records,
                run.spans,
                run.baseline.proxy_events,
                out_dir / "timeline-baseline.png",
                title=f"drill {spec.name}: baseline (failover off)",
                ended=run.baseline.ended,
                stalls=run.baseline.stalls(),
            )
        )
    files["requests"] = str(out_dir / "requests.jsonl")
    with open(out_dir / "requests.jsonl", "w") as handle:
        for result in (run.main, run.baseline):
            if result is None:
                continue
            for record in result.records:
                handle.write(json.dumps({"pass": result.label, **record.to_json()}) + "\n")
    files["gateway_metrics"] = str(out_dir / "gateway-metrics.jsonl")
    with open(out_dir / "gateway-metrics.jsonl", "w") as handle:
        for result in (run.main, run.baseline):
            if result is None:
                continue
            for t, values in result.metrics.samples:
                own = {k: v for k, v in values.items() if k.startswith("skyfabric_")}
                handle.write(json.dumps({"pass": result.label, "t": round(t, 3), "metrics": own}) + "\n")
    report = build_report(run, files)
    write_json(report, out_dir / "report.json")
    markdown = render_markdown(report)
    (out_dir / "report.md").write_text(markdown)
    click.echo(markdown)
    sys.exit(EXIT_PASSED if report["passed"] else EXIT_MISSED)
