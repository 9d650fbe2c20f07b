"""``skyfabric status`` against a live gateway: the tree, the ejection's cause, the figures, the feed."""

from __future__ import annotations

import asyncio
import io

import pytest
from rich.console import Console

from skyfabric.control.status import recent, run
from skyfabric.drills.announce import DrillAnnouncer
from tests.conftest import MakeGateway
from tests.support.fake_upstream import FakeUpstream

KEY = "sk-test-key-0001"


async def test_status_shows_a_down_provider_with_its_cause(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(
        {"aws": [FakeUpstream("a", default="reset")], "gcp": [FakeUpstream("b", tokens=4)]},
        api_keys=[{"key": KEY}],
        health={"probe_interval": 0, "base_ejection": 30},  # still out when the status is read
        observability={"dashboard_interval": 0.1},
    )
    client = gw.client()
    aws = gw.gateway.proxy.states["aws/r1/pool/0"]
    for _ in range(30):  # the balancer breaks ties at random: go on until aws has been tried
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        if aws.ejections:
            break
    out = io.StringIO()
    console = Console(file=out, width=140, color_system=None)
    code = await asyncio.to_thread(run, gw.root, KEY, 1.0, True, console)
    text = out.getvalue()
    assert code == 0
    assert " aws down " in text and " gcp up " in text
    assert "aws/r1/pool/0  down" in text
    assert "upstream connection lost: upstream closed the connection" in text
    assert "gcp/r1/pool/0  up" in text and "ejection" in text and "failover" in text
    assert "drill" not in text  # none announced

    # A drill announces itself (as `skyfabric drill` does): the status names it and the fault that is on.
    announcer = DrillAnnouncer(gw.root, KEY, "d1")
    assert await announcer.send("start", scenario="provider-down", duration=60)
    assert await announcer.send("fault_on", fault="refuse aws", target="aws", mode="refuse")
    await announcer.close()
    out = io.StringIO()
    await asyncio.to_thread(run, gw.root, KEY, 1.0, True, Console(file=out, width=140, color_system=None))
    assert "drill provider-down  running" in out.getvalue() and "aws: refuse on" in out.getvalue()

    denied = io.StringIO()
    code = await asyncio.to_thread(run, gw.root, "sk-wrong-key-00", 1.0, True, Console(file=denied))
    assert code == 1 and "401" in denied.getvalue()


def test_recent_figures_from_points() -> None:
    # [time, seconds, attempts, failed, ttft p50, ttft p99, tokens]
    points = [[0, 1.0, 10, 0, 0.1, 0.2, 50], [1, 1.0, 10, 5, None, None, 30], [2, 2.0, 20, 0, 0.3, 0.4, 40]]
    # The newest 3 seconds are the last two points: 30 attempts, 5 failed, 70 tokens.
    assert recent(points, seconds=3.0) == pytest.approx(
        {"rps": 10.0, "errors": 5 / 30, "ttft": 0.3, "tps": 70 / 3}
    )
    assert recent([], seconds=3.0)["rps"] is None
