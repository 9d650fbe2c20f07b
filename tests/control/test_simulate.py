"""The fleet simulator: the gateway's own router on a virtual clock, against simulated batching replicas."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from skyfabric.cli import cli
from skyfabric.control.plan import Offer, Plan, Requirements, plan, save_plan
from skyfabric.sim.clock import VirtualClockLoop
from skyfabric.sim.fleetsim import Loss, Workload, render, simulate

OFFERS = [
    Offer("aws", "us-east-1", "nvidia-h100", "vllm", 55.0, 84.2),
    Offer("gcp", "us-central1", "tpu-v6e", "vllm-tpu", 21.6, 127.0),
    Offer("azure", "eastus", "nvidia-a100", "vllm", 27.2, 32.1),
]
WORK = Workload(150.0, [(700, 290), (300, 100), (1200, 500)])


def test_virtual_clock_jumps_to_the_next_timer() -> None:
    loop = VirtualClockLoop()

    async def main() -> float:
        async with asyncio.timeout(3600):
            await asyncio.gather(*(asyncio.sleep(600 + i) for i in range(100)))
        return loop.time()

    started = time.perf_counter()
    try:
        assert loop.run_until_complete(main()) == 699.0
    finally:
        loop.close()
    assert time.perf_counter() - started < 1.0  # ~12 virtual minutes, no real waiting


def test_planned_fleet_survives_the_loss_of_its_largest_provider() -> None:
    result_plan = plan(OFFERS, Requirements(150.0))
    biggest = max(
        result_plan.providers(),
        key=lambda p: result_plan.capacity() - result_plan.capacity(without_provider=p),
    )
    result = simulate(result_plan, "m", WORK, 90.0, Loss(biggest, 30.0, 30.0), seed=1)
    _, during, after = result.phases
    assert during.requests > 1000 and after.requests > 1000
    assert during.retries > 0  # in-flight requests on the lost provider were retried elsewhere …
    assert during.errors == 0 and during.shed == 0  # … and every one of them got an answer
    assert result.held, result.verdict
    assert all(value == 0 for value in result.leftovers.values()), result.leftovers


def test_an_underprovisioned_fleet_is_found_out() -> None:
    """One replica per provider: losing gcp leaves 116 req/s for 150 — the simulator must say so."""
    thin = Plan(OFFERS, [1, 1, 1], Requirements(150.0), 0.0)
    result = simulate(thin, "m", WORK, 90.0, Loss("gcp", 30.0, 30.0), seed=1)
    during = result.phases[1]
    assert not result.held
    assert max(during.ttft) > 5.0 or during.shed + during.errors > 0.01 * during.requests
    assert all(value == 0 for value in result.leftovers.values()), result.leftovers


def test_the_gateways_retry_budget_is_in_the_loop() -> None:
    """With the fleet's retry budget at zero, the requests reset by the loss fail instead of moving."""
    result_plan = plan(OFFERS, Requirements(150.0))
    strict = {"retry": {"budget_percent": 0, "min_retry_concurrency": 0}}
    result = simulate(result_plan, "m", WORK, 60.0, Loss("gcp", 20.0, 20.0), seed=1, fleet_overrides=strict)
    during = result.phases[1]
    assert during.errors > 50
    assert during.retries <= during.errors / 20  # (a request whose whole fleet was out may wait and go again)
    assert result.extra["retry_budget_refused"] >= during.errors * 0.9
    assert all(value == 0 for value in result.leftovers.values()), result.leftovers


def test_default_retry_budget_is_too_small_for_losing_a_provider_that_carries_half_the_load() -> None:
    """Envoy's 20 % budget cannot retry the ~56 % of in-flight requests a gcp loss resets here; the
    budget the planner writes (largest provider share + 5 points) can."""
    result_plan = plan(OFFERS, Requirements(150.0))
    default = {"retry": {"budget_percent": 20}}
    result = simulate(result_plan, "m", WORK, 60.0, Loss("gcp", 20.0, 20.0), seed=1, fleet_overrides=default)
    assert result.phases[1].errors > 0 and result.extra["retry_budget_refused"] > 0
    planned = simulate(result_plan, "m", WORK, 60.0, Loss("gcp", 20.0, 20.0), seed=1)
    assert planned.phases[1].errors == 0 and planned.extra["retry_budget_refused"] == 0


def test_cli_simulate(tmp_path: Path) -> None:
    save_plan(plan(OFFERS, Requirements(100.0)), "m", tmp_path / "plan.yaml")
    out = CliRunner().invoke(
        cli, ["simulate", str(tmp_path / "plan.yaml"), "--duration", "30", "--lose", "aws", "--rate", "80"]
    )
    assert out.exit_code == 0, out.output
    assert "during" in out.output and "× real time" in out.output
    bad = CliRunner().invoke(cli, ["simulate", str(tmp_path / "plan.yaml"), "--lose", "oracle"])
    assert bad.exit_code != 0 and "no such provider" in bad.output


def test_losing_one_region_takes_only_its_endpoints() -> None:
    offers = [
        Offer("aws", "east", "nvidia-h100", "vllm", 1.0, 84.2),
        Offer("aws", "west", "nvidia-h100", "vllm", 1.0, 84.2),
        Offer("gcp", "central", "nvidia-h100", "vllm", 1.0, 84.2),
    ]
    fleet_plan = Plan(offers, [1, 1, 1], Requirements(100.0), 0.0)
    result = simulate(fleet_plan, "m", WORK, 60.0, Loss("aws/east", 20.0, 20.0), seed=2)
    during = result.phases[1]
    assert during.retries > 0 and during.errors == 0
    assert result.held, result.verdict
    assert all(value == 0 for value in result.leftovers.values()), result.leftovers


@pytest.mark.slow
def test_simulator_beside_a_live_drill_on_the_embedded_fleet(tmp_path: Path) -> None:
    """A real 60-s drill now (trace-outage at ×1.5, aws blackholed 40–60 %), then the simulation of its own
    requests on the replica-host model (three embedded replicas sharing this machine's cores, the host's
    other load as sampled during the drill).

    Asserted: the simulator replays the drill's requests, every one; per phase both lose no request (success
    within 0.5 points) and start no retry storm (retries ≤ max(3, 3 %) of a phase); no simulated stream
    is broken; the host's other load was measured. The timing tolerances (TTFT ±max(50 ms, 30 %),
    latency ±30 %) are printed by the bench and asserted on the committed quiet drill (next test), not
    here: on this shared 2-vCPU machine four live runs gave simulated/drill latency p50 from 0.44 to
    1.36 and TTFT p50 19–263 ms low — no honest bound held reliably (docs/planning.md).
    """
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    summary = tmp_path / "summary.json"
    cmd = [sys.executable, str(root / "bench" / "sim_vs_drill.py"), "--live", "60"]
    cmd += ["--out", str(tmp_path / "drill"), "--summary", str(summary)]
    out = subprocess.run(
        cmd,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PYTHONPATH": str(root / "src"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert summary.exists(), out.stdout + out.stderr
    assert (tmp_path / "drill" / "host-load.json").exists()  # the host's other load was measured
    phases = json.loads(summary.read_text())["phases"]
    # the very same requests, every one accounted for (per phase they are counted by when their answer
    # ended, so they move across a boundary with the timings: up to 12 of 96 in one run here)
    assert sum(p["sim"]["requests"] for p in phases) == sum(p["drill"]["requests"] for p in phases)
    for phase in phases:
        drill, sim = phase["drill"], phase["sim"]
        assert abs(sim["success_rate"] - drill["success_rate"]) <= 0.5, phase
        # no retry storm: the requests in flight on the lost provider, not more (≤ 3, or 3 % of a phase)
        assert sim["retries"] <= max(3, 0.03 * sim["requests"]), phase
        assert drill["retries"] <= max(3, 0.03 * drill["requests"]), phase
        assert sim["broken"] == 0 and sim["streams"] > 0, phase
    assert sum(p["drill"]["requests"] for p in phases) > 100, out.stdout


def test_simulator_agrees_with_the_committed_quiet_drill_within_stated_tolerances() -> None:
    """Regression: a drill taken on a quiet machine (committed) still agrees on every stated tolerance."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    report = root / "docs" / "drills" / "results" / "trace-outage-aws" / "report.json"
    out = subprocess.run(
        [sys.executable, str(root / "bench" / "sim_vs_drill.py"), "--report", str(report)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(root / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "AGREES within the stated tolerances" in out.stdout


def test_blackhole_every_request_is_accounted_for_and_nothing_is_left_in_flight() -> None:
    result_plan = plan(OFFERS, Requirements(150.0))
    result = simulate(result_plan, "m", WORK, 60.0, Loss("gcp", 20.0, 20.0, "blackhole"), seed=3)
    answered = sum(p.ok + p.errors + p.shed for p in result.phases)
    assert answered == sum(p.requests for p in result.phases) == result.events
    assert result.phases[1].requests > 1000
    assert all(value == 0 for value in result.leftovers.values()), result.leftovers


STREAMED = Workload(60.0, [(700, 290), (300, 100), (1200, 500)])


def test_streams_lost_mid_answer_are_continued_whole_through_the_relay() -> None:
    """Streams cut by the loss move to another endpoint mid-answer and every client gets the whole answer."""
    result_plan = plan(OFFERS, Requirements(60.0))
    for mode in ("refused", "blackhole"):
        result = simulate(
            result_plan, "m", STREAMED, 40.0, Loss("gcp", 15.0, 10.0, mode), seed=2, stream_share=1.0
        )
        before, during, after = result.phases
        assert during.streams == during.requests > 300
        assert during.continued > 5, mode  # streams in flight on gcp went on elsewhere …
        assert during.broken == during.errors == 0, mode  # … each token once, in order, no in-band error
        assert before.continued == after.continued == 0
        assert len(during.stream_ttft) == during.streams
        assert result.held, result.verdict
        assert all(value == 0 for value in result.leftovers.values()), (mode, result.leftovers)
        assert "continued" in render(result)


def test_without_continuation_the_cut_streams_reach_the_client_broken() -> None:
    """The check above can fail: with no failover after the first token, cut streams are broken."""
    result_plan = plan(OFFERS, Requirements(60.0))
    overrides = {"retry": {"budget_percent": 60, "max_continuations": 0}}
    result = simulate(
        result_plan,
        "m",
        STREAMED,
        40.0,
        Loss("gcp", 15.0, 10.0),
        seed=2,
        stream_share=1.0,
        fleet_overrides=overrides,
    )
    during = result.phases[1]
    assert during.continued == 0
    assert during.broken > 5  # the in-band error the relay sends, seen by the client
    assert not result.held
