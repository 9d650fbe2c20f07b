"""A drill on the real embedded fleet: three replica processes of the shipped model, the real gateway.

This is the acceptance path (``skyfabric drill provider-outage --provider aws``) cut to a short run. It
needs the shipped weights (``skyfabric grow`` makes them) and the replica engine.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from skyfabric.core.fleet import load_fleet
from skyfabric.drills.cli import default_fleet
from skyfabric.drills.report import build_report, render_markdown
from skyfabric.drills.runner import DrillOptions, run_drill
from skyfabric.drills.scenario import load_scenario

pytestmark = pytest.mark.slow


def test_provider_outage_on_the_embedded_fleet(tmp_path: Path) -> None:
    options = DrillOptions(
        scenario=load_scenario("provider-outage"),
        fleet=load_fleet(default_fleet()),
        fleet_path=default_fleet(),
        out_dir=tmp_path,
        provider="aws",
        duration=15.0,
        replica_timeout=180.0,
    )
    run = asyncio.run(run_drill(options))
    report = build_report(run, {})
    totals = report["result"]["totals"]
    assert totals["requests"] >= 20
    assert totals["truncated"] == 0
    assert report["passed"], render_markdown(report)
    assert set(report["endpoints"]) == {
        "aws/us-east-1/trn2/0",
        "gcp/us-central1/v6e/0",
        "azure/eastus/h100/0",
    }
    during = next(p for p in report["result"]["phases"] if p["kind"] == "during")
    assert "aws" not in during["served_by"]  # nothing came back from the blackholed provider
    # The answers were real: forced lengths, counted by the replicas.
    assert all(r.completion_tokens == r.output_tokens for r in run.main.records if r.ok)
    # Every process was stopped: the gateway's and the replicas' ports are closed.
    data = yaml.safe_load((tmp_path / "fleet.drill.yaml").read_text())
    ports = [data["listener"]["port"], *(urlsplit(url).port for url in run.upstreams.values())]
    for port in ports:
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            pass
