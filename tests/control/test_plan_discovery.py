"""``skyfabric plan --discovery``: the fleet file's pools find their replicas through the services that
``skyfabric launch-spec`` starts — the same names, namespace and port — and the fleet loader accepts it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from skyfabric.cli import cli
from skyfabric.core.endpoints import fleet_endpoints
from skyfabric.core.fleet import Fleet, load_fleet
from skyfabric.gateway.discovery_kubernetes import slice_addresses

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "three-clouds.offers.yaml"


def _plan_and_launch(tmp_path: Path, *plan_args: str) -> tuple[Fleet, dict[str, Any], Path]:
    runner = CliRunner()
    fleet_path, plan_path = tmp_path / "fleet.yaml", tmp_path / "plan.yaml"
    args = ["plan", str(EXAMPLE), "--fleet-out", str(fleet_path), "--plan-out", str(plan_path), *plan_args]
    out = runner.invoke(cli, args)
    assert out.exit_code == 0, out.output
    launch = tmp_path / "launch"
    out = runner.invoke(
        cli, ["launch-spec", str(plan_path), "--hf-model", "m/x", "--out", str(launch), "--namespace", "llm"]
    )
    assert out.exit_code == 0, out.output
    return load_fleet(fleet_path), yaml.safe_load(plan_path.read_text()), launch


def _pools(fleet: Fleet) -> dict[tuple[str, str, str], Any]:
    return {
        (p.name, r.name, pool.accelerator): pool
        for p in fleet.providers
        for r in p.regions
        for pool in r.pools
    }


def test_skypilot_discovery_names_the_services_launch_spec_starts(tmp_path: Path) -> None:
    fleet, plan, launch = _plan_and_launch(tmp_path, "--discovery", "skypilot")
    pools = _pools(fleet)
    assert len(pools) == len(plan["pools"]) == 3
    for planned in plan["pools"]:
        pool = pools[(planned["provider"], planned["region"], planned["accelerator"])]
        assert pool.discovery is not None and pool.discovery.kind == "skypilot"
        assert pool.endpoints == []  # one endpoint per READY replica, learned at run time
        service = yaml.safe_load((launch / "skypilot" / f"{pool.discovery.service}.yaml").read_text())
        assert service["name"] == pool.discovery.service  # `sky serve up <file> -n <name>`
        assert service["service"]["replicas"] == planned["replicas"]
        # capacity and price are per replica now, not per pool
        assert pool.capacity.concurrency == planned["concurrency"]
        assert pool.price_per_hour == planned["price_per_hour"]
    assert fleet_endpoints(fleet) == []  # nothing static: discovery fills the pools


def test_kubernetes_discovery_matches_the_manifests_service_namespace_and_port(tmp_path: Path) -> None:
    fleet, plan, launch = _plan_and_launch(
        tmp_path,
        *("--discovery", "kubernetes", "--namespace", "llm"),
        *("--kubeconfig", "/etc/skyfabric/kubeconfig", "--kube-context", "{provider}-prod"),
    )
    for planned in plan["pools"]:
        pool = _pools(fleet)[(planned["provider"], planned["region"], planned["accelerator"])]
        spec = pool.discovery
        assert spec is not None and spec.kind == "kubernetes"
        assert spec.kubeconfig == "/etc/skyfabric/kubeconfig"
        assert spec.context == f"{planned['provider']}-prod"  # one cluster per provider
        docs = list(yaml.safe_load_all((launch / "kubernetes" / f"{spec.service}.yaml").read_text()))
        service = next(d for d in docs if d["kind"] == "Service")
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        assert service["metadata"]["name"] == spec.service
        assert service["metadata"]["namespace"] == spec.namespace == "llm"
        # The EndpointSlice controller names the slice port after the Service port and numbers it with
        # the container port the targetPort names: what the gateway will pick by `port`.
        (svc_port,) = service["spec"]["ports"]
        container_ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
        target = next(p["containerPort"] for p in container_ports if p["name"] == svc_port["targetPort"])
        endpoint_slice = {
            "ports": [{"name": svc_port["name"], "port": target}],
            "endpoints": [{"addresses": ["10.4.0.7"], "conditions": {"ready": True}}],
        }
        assert slice_addresses([endpoint_slice], spec.port) == [("10.4.0.7", 8000)]


def test_discovery_options_are_checked(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["plan", str(EXAMPLE), "--discovery", "skypilot", "--kubeconfig", "k"])
    assert out.exit_code == 2 and "for --discovery kubernetes" in out.output
    out = runner.invoke(cli, ["plan", str(EXAMPLE), "--discovery", "kubernetes", "--kube-context", "x"])
    assert out.exit_code == 2 and "give that too" in out.output
    # default: one service URL per pool, as before
    out = runner.invoke(cli, ["plan", str(EXAMPLE), "--fleet-out", str(tmp_path / "f.yaml")])
    assert out.exit_code == 0, out.output
    pools = _pools(load_fleet(tmp_path / "f.yaml")).values()
    assert all(p.discovery is None and len(p.endpoints) == 1 for p in pools)
