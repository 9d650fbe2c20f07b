"""The control plane's verbs: ``skyfabric plan`` and ``skyfabric launch-spec`` (loaded lazily by cli.py)."""

from __future__ import annotations

import time
from pathlib import Path

import click
import yaml

from skyfabric.core.errors import ConfigError


@click.command("plan")
@click.argument("offers", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--profiles",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="measured throughput per accelerator (same shape as the shipped profiles.yaml)",
)
@click.option("--peak", type=float, default=None, help="override the offers file's demand (per second)")
@click.option("--survive", type=float, default=None, help="share of the peak kept after losing any provider")
@click.option("--survive-region", type=float, default=None, help="share kept after losing any region")
@click.option("--max-provider-share", type=float, default=None, help="no provider above this share")
@click.option(
    "--fleet-out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="write the fleet file that serves the plan here",
)
@click.option(
    "--plan-out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="write the plan (offers and replicas, YAML) here — input of launch-spec and simulate",
)
@click.option(
    "--endpoint-template",
    default="http://{service}.skyfabric.internal:8000/v1",
    show_default=True,
    help="each pool's URL in the fleet file; {service} {provider} {region} {pool}",
)
@click.option(
    "--discovery",
    type=click.Choice(["none", "skypilot", "kubernetes"]),
    default="none",
    show_default=True,
    help="how the fleet file's pools find their replicas: one service URL each (none), the SkyServe "
    "service of launch-spec's SkyPilot YAML, or the EndpointSlices of its Kubernetes Service",
)
@click.option(
    "--namespace",
    default="skyfabric",
    show_default=True,
    help="kubernetes discovery: launch-spec's namespace",
)
@click.option(
    "--kubeconfig", default=None, help="kubernetes discovery: the gateway's kubeconfig (else in-cluster)"
)
@click.option(
    "--kube-context",
    default=None,
    help="kubernetes discovery: the kubeconfig context of each pool's cluster; {provider} {region}",
)
def plan_command(
    offers: Path,
    profiles: Path | None,
    peak: float | None,
    survive: float | None,
    survive_region: float | None,
    max_provider_share: float | None,
    fleet_out: Path | None,
    plan_out: Path | None,
    endpoint_template: str,
    discovery: str,
    namespace: str,
    kubeconfig: str | None,
    kube_context: str | None,
) -> None:
    """The cheapest replica counts over OFFERS (YAML) that carry the peak after losing any one provider."""
    from dataclasses import replace

    from skyfabric.control.plan import (
        DiscoveryPlan,
        load_offers,
        load_profiles,
        plan,
        render_table,
        save_plan,
        to_fleet,
    )

    if discovery != "kubernetes" and (kubeconfig or kube_context):
        raise click.UsageError("--kubeconfig and --kube-context are for --discovery kubernetes")
    if kube_context and not kubeconfig:
        raise click.UsageError("--kube-context names a context of --kubeconfig: give that too")
    found = (
        None if discovery == "none" else DiscoveryPlan(discovery, namespace, kubeconfig, kube_context)  # type: ignore[arg-type]
    )
    from skyfabric.core.fleet import parse_fleet

    try:
        table = load_profiles(profiles)
        offer_list, req, meta = load_offers(offers, table)
        if peak is not None:
            req = replace(req, demand=peak)
        if survive is not None:
            req = replace(req, survive_provider=survive)
        if survive_region is not None:
            req = replace(req, survive_region=survive_region)
        if max_provider_share is not None:
            req = replace(req, max_provider_share=max_provider_share)
        started = time.perf_counter()
        result = plan(offer_list, req)
        took = time.perf_counter() - started
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(render_table(result))
    click.echo(f"solved {len(offer_list)} offers with HiGHS in {took:.3f}s (optimality gap 0)")
    if fleet_out is not None:
        data = to_fleet(result, meta["model"], endpoint_template, found)
        try:
            parse_fleet(data, str(fleet_out))  # the loader's own check: never write a fleet it would refuse
        except ConfigError as exc:
            raise click.ClickException(f"the fleet file for this plan would not load:\n{exc}") from None
        fleet_out.write_text(yaml.safe_dump(data, sort_keys=False))
        click.echo(f"fleet file: {fleet_out}")
    if plan_out is not None:
        save_plan(result, meta["model"], plan_out)
        click.echo(f"plan: {plan_out}")


@click.command("launch-spec")
@click.argument("plan_file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--hf-model", required=True, help="the checkpoint vLLM serves, e.g. meta-llama/Llama-2-70b-chat-hf"
)
@click.option(
    "--out", type=click.Path(path_type=Path, file_okay=False), required=True, help="output directory"
)
@click.option("--namespace", default="skyfabric", show_default=True, help="Kubernetes namespace")
@click.option(
    "--fleet-file",
    default="fleet.yaml",
    show_default=True,
    help="the fleet file the gateway instances serve (from `skyfabric plan --fleet-out`)",
)
def launch_spec_command(plan_file: Path, hf_model: str, out: Path, namespace: str, fleet_file: str) -> None:
    """Write SkyPilot service YAML and Kubernetes manifests for each pool of PLAN_FILE, and gateway tasks."""
    from skyfabric.control.launch import write_specs
    from skyfabric.control.plan import load_plan

    try:
        _, result = load_plan(plan_file)
        paths = write_specs(result, hf_model, out, namespace=namespace, fleet_file=fleet_file)
    except (ConfigError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    for path in paths:
        click.echo(str(path))
