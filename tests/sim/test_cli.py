"""``skyfabric simulate`` with replicas placed on shared hosts (``--host-cores``, ``--host``)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from skyfabric.cli import cli
from skyfabric.control.plan import Offer, Plan, Requirements, save_plan

EMBEDDED = [
    Offer("aws", "us-east-1", "trainium2", "local", 1.34, 20.0, concurrency=16, name="trn2"),
    Offer("gcp", "us-central1", "tpu-v6e", "local", 1.38, 20.0, concurrency=16, name="v6e"),
    Offer("azure", "eastus", "nvidia-h100", "local", 2.49, 20.0, concurrency=16, name="h100"),
]


def test_simulate_the_embedded_fleet_on_one_shared_host(tmp_path: Path) -> None:
    save_plan(Plan(EMBEDDED, [1, 1, 1], Requirements(5.0), 0.0), "skyfabric-code", tmp_path / "plan.yaml")
    args = ["simulate", str(tmp_path / "plan.yaml"), "--duration", "30", "--rate", "1", "--lose", "aws"]
    out = CliRunner().invoke(cli, [*args, "--host-cores", "2", "--mode", "blackhole"])
    assert out.exit_code == 0, out.output
    assert "during" in out.output and "replica_running=0" in out.output  # every request accounted for
    placed = CliRunner().invoke(cli, [*args, "--host", "trn2=box:2", "--host", "v6e=box:2:0.5"])
    assert placed.exit_code == 0, placed.output
    for bad in ("trn2=box", "nope=box:2", "trn2=box:zero"):
        wrong = CliRunner().invoke(cli, [*args, "--host", bad])
        assert wrong.exit_code != 0 and "--host" in wrong.output, bad
