"""``skyfabric simulate``: a planned fleet, a workload and a provider loss, on a virtual clock."""

from __future__ import annotations

from pathlib import Path

import click

from skyfabric.core.errors import ConfigError


@click.command("simulate")
@click.argument("plan_file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--rate", type=float, default=None, help="client requests/s (default: the plan's peak demand)")
@click.option(
    "--trace",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="Azure-style trace: sizes and per-minute rate shape; mean scaled to --rate, else peak to the plan's",
)
@click.option("--duration", type=float, default=600.0, show_default=True, help="simulated seconds")
@click.option(
    "--lose", "lose", default=None, help="provider (aws) or region (aws/us-east-1) lost for a window"
)
@click.option("--lose-at", type=float, default=None, help="when the loss starts (default: a third in)")
@click.option("--lose-for", type=float, default=None, help="how long it lasts (default: a third)")
@click.option(
    "--mode",
    type=click.Choice(["refused", "blackhole"]),
    default="refused",
    show_default=True,
    help="how the lost provider fails: connections refused, or silence until the connect timeout",
)
@click.option(
    "--granularity",
    type=int,
    default=1,
    show_default=True,
    help="client requests per simulated request (coarser is faster; ratios are kept)",
)
@click.option(
    "--group",
    type=int,
    default=1,
    show_default=True,
    help="replicas behind one gateway endpoint (a pool's service load balancer); 1: per replica",
)
@click.option(
    "--stream-share",
    type=float,
    default=0.0,
    show_default=True,
    help="share of requests streamed through the gateway's relay (mid-stream continuation on a loss)",
)
@click.option(
    "--host-cores",
    type=float,
    default=None,
    help="every pool's replicas share ONE host of this many cores (the embedded fleet: local processes); "
    "they are stepped like the embedded engine's batcher with --step-profile",
)
@click.option(
    "--host",
    "host_specs",
    multiple=True,
    metavar="POOL=NAME:CORES[:BACKGROUND]",
    help="place a pool on a shared host (repeatable; pools naming one host share its cores); "
    "pools not placed are independent accelerators",
)
@click.option(
    "--step-profile",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="measured step times of the hosted replicas (default: the embedded engine's, "
    "sim/embedded_steps.yaml; redo with bench/replica_steps.py)",
)
@click.option("--probe-interval", type=float, default=None, help="override the fleet's health.probe_interval")
@click.option("--slo-ttft-p99", type=float, default=5.0, show_default=True)
@click.option("--max-error-rate", type=float, default=0.01, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def simulate_command(
    plan_file: Path,
    rate: float | None,
    trace: Path | None,
    duration: float,
    lose: str | None,
    lose_at: float | None,
    lose_for: float | None,
    mode: str,
    granularity: int,
    group: int,
    stream_share: float,
    host_cores: float | None,
    host_specs: tuple[str, ...],
    step_profile: Path | None,
    probe_interval: float | None,
    slo_ttft_p99: float,
    max_error_rate: float,
    seed: int,
) -> None:
    """Run the gateway's own routing code against PLAN_FILE's fleet (from `skyfabric plan --plan-out`)."""
    import logging

    from skyfabric.control.plan import load_plan
    from skyfabric.sim.fleetsim import Loss, Workload, render, simulate, trace_workload
    from skyfabric.sim.host import EMBEDDED_STEPS, HostSpec, load_step_profile

    try:
        model, plan = load_plan(plan_file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    domains = {o.provider for o in plan.offers} | {f"{o.provider}/{o.region}" for o in plan.offers}
    if lose is not None and lose not in domains:
        raise click.ClickException(
            f"--lose {lose!r}: the plan has no such provider or region (it has: {', '.join(sorted(domains))})"
        )
    if granularity < 1 or group < 1:
        raise click.ClickException("--granularity and --group must be ≥ 1")
    if not 0.0 <= stream_share <= 1.0:
        raise click.ClickException("--stream-share is a share: between 0 and 1")
    if plan.requirements.unit == "requests":
        default_rate = plan.requirements.demand
    elif trace is None:
        raise click.ClickException("the plan is in tokens/s: give --rate (requests/s) or --trace")
    else:
        default_rate = None
    workload = (
        trace_workload(trace, rate, peak=default_rate)  # the trace's busiest minute = the plan's peak
        if trace
        else Workload(rate if rate is not None else float(default_rate or 1.0), [(700, 290)])
    )
    loss = (
        Loss(
            lose,
            lose_at if lose_at is not None else duration / 3,
            lose_for if lose_for is not None else duration / 3,
            mode,
        )
        if lose
        else None
    )
    hosts: dict[str, HostSpec] = {}
    if host_cores is not None or host_specs:
        try:
            steps = load_step_profile(step_profile or EMBEDDED_STEPS)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        if host_cores is not None:
            hosts = {o.pool: HostSpec("host", host_cores, profile=steps) for o in plan.offers}
        for spec in host_specs:
            pool, _, where = spec.partition("=")
            parts = where.split(":")
            try:
                name, cores, background = (
                    parts[0],
                    float(parts[1]),
                    float(parts[2]) if len(parts) > 2 else 0.0,
                )
            except (IndexError, ValueError):
                raise click.ClickException(
                    f"--host {spec!r}: expected POOL=NAME:CORES[:BACKGROUND]"
                ) from None
            if pool not in {o.pool for o in plan.offers} or not name or cores <= 0:
                raise click.ClickException(f"--host {spec!r}: no pool {pool!r} in the plan, or no cores")
            hosts[pool] = HostSpec(name, cores, background, profile=steps)
    if logging.getLogger().level > logging.INFO:
        logging.getLogger("skyfabric.gateway").setLevel(logging.ERROR)  # one line per ejection, ×1000s
    overrides = {"health": {"probe_interval": probe_interval}} if probe_interval is not None else None
    result = simulate(
        plan,
        model,
        workload,
        duration,
        loss,
        granularity=granularity,
        group=group,
        stream_share=stream_share,
        seed=seed,
        fleet_overrides=overrides,
        hosts=hosts or None,
        slo_ttft_p99=slo_ttft_p99,
        max_error_rate=max_error_rate,
        progress=lambda t: click.echo(f"  … {t:,.0f}s simulated", err=True),
    )
    click.echo(render(result))
