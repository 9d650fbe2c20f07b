"""Every built-in scenario end to end: the real gateway (a subprocess) in front of stub backends.

Each drill runs a few seconds of workload; the stubs answer in milliseconds and the fleet's timeouts are
short, so a fault is detected and recovered from inside the drill's window.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from skyfabric.core.fleet import load_fleet
from skyfabric.drills.report import build_report
from skyfabric.drills.runner import DrillOptions, DrillRun, run_drill
from skyfabric.drills.scenario import builtin_scenarios, load_scenario

pytestmark = pytest.mark.slow

DURATION = 6.0


def drill(name: str, fleet: Path, out: Path, **kwargs: Any) -> tuple[DrillRun, dict[str, Any]]:
    options = DrillOptions(
        scenario=load_scenario(name),
        fleet=load_fleet(fleet),
        fleet_path=fleet,
        out_dir=out,
        duration=kwargs.pop("duration", DURATION),
        **kwargs,
    )
    run = asyncio.run(run_drill(options))
    return run, build_report(run, {})


def edge(report: dict[str, Any]) -> dict[str, int]:
    actions: dict[str, int] = {}
    for fault in report["result"]["faults"]:
        for action, count in fault["edge_actions"].items():
            actions[action] = actions.get(action, 0) + count
    return actions


def gateway_port(out: Path) -> int:
    return int(yaml.safe_load((out / "fleet.drill.yaml").read_text())["listener"]["port"])


@pytest.mark.parametrize("name", builtin_scenarios())
def test_builtin_scenario_against_stubs(name: str, stub_fleet: Path, tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {}
    if name == "region-loss":
        kwargs["region"] = "us-west-2"
    if name == "trace-outage":
        kwargs["speed"] = 4.0  # the trace's first seconds are quiet
    run, report = drill(name, stub_fleet, tmp_path, **kwargs)
    totals = report["result"]["totals"]
    assert totals["requests"] >= 8, totals
    assert totals["truncated"] == 0
    assert report["passed"], report["result"]["slo"]
    assert report["result"]["gateway_metrics"] is True  # skyfabric's gateway exposes /metrics: it was read
    actions = edge(report)
    if name in ("provider-outage", "region-loss", "trace-outage"):
        switched = {s["endpoint"] for s in report["result"]["switches"] if s["mode"] == "blackhole"}
        assert switched == set(report["result"]["faults"][0]["endpoints"])
        assert "forward" not in actions  # nothing went through the hole
    if name == "region-loss":
        assert report["result"]["faults"][0]["endpoints"] == ["aws/us-west-2/p/0"]
    if name == "brownout":
        assert report["result"]["faults"][0]["kind"] == "latency ×10"
    if name == "throttle":
        assert actions.get("throttle", 0) >= 1
    if name == "cut-streams":
        assert actions.get("cut", 0) >= 1
        rescued = report["result"]["totals"]["gateway"]["rescued"]
        assert rescued is not None and rescued >= 1  # the cut streams were continued, and counted
    if name == "flap":
        assert len(run.spans[0].windows) >= 3
    if name == "network-blip":
        assert len(report["result"]["faults"][0]["endpoints"]) == len(run.endpoints)
    if name == "steady":
        assert report["result"]["faults"] == []
        assert totals["success_rate"] == 100.0
    # Nothing is left running: the gateway's port is closed.
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", gateway_port(tmp_path)), timeout=1):
        pass


def test_baseline_shows_what_failover_saves(stub_fleet: Path, tmp_path: Path) -> None:
    run, report = drill("cut-streams", stub_fleet, tmp_path, baseline=True)
    assert run.baseline is not None
    base = report["baseline"]["totals"]
    main = report["result"]["totals"]
    assert main["interrupted"] == 0 and main["truncated"] == 0
    assert base["interrupted"] >= 1  # cut streams reach the client when nothing continues them
    assert len(run.main.records) == len(run.baseline.records)  # the same planned arrivals
    baseline_fleet = yaml.safe_load((tmp_path / "fleet.baseline.yaml").read_text())
    assert baseline_fleet["retry"]["max_attempts"] == 1
    assert baseline_fleet["retry"]["max_continuations"] == 0


def test_cli_prints_the_report_and_writes_files(stub_fleet: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "skyfabric.cli", "drill", "provider-outage", "--config", str(stub_fleet),
         "--provider", "gcp", "--duration", "4", "--out", str(out), "--seed", "7"],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "# Drill `provider-outage`: SLO PASSED" in proc.stdout
    assert "blackhole gcp" in proc.stdout
    for name in ("report.json", "report.md", "timeline.png", "requests.jsonl", "fleet.drill.yaml"):
        assert (out / name).exists(), name


def test_cli_exits_2_on_a_bad_target(stub_fleet: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "skyfabric.cli", "drill", "provider-outage", "--config", str(stub_fleet),
         "--provider", "oracle", "--duration", "2", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "no provider 'oracle'" in proc.stderr
