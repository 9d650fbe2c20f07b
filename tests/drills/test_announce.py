"""A drill tells the gateway under test what it is doing: the timeline the dashboard draws is the drill's.

The runner's fault player (``runner._play``) switches real fault proxies and announces each fault going on
and off (``drills/announce.py``) to a real gateway's ``/dashboard/drill``; the gateway's state then holds
the drill's timeline with the fault's window, in the gateway's own clock.
"""

from __future__ import annotations

import time

import httpx
import pytest

from skyfabric.drills.announce import DrillAnnouncer
from skyfabric.drills.faultproxy import FaultProxy
from skyfabric.drills.runner import _play
from skyfabric.drills.scenario import Scenario
from skyfabric.drills.timeline import build_timeline
from tests.conftest import MakeGateway
from tests.support.fake_upstream import FakeUpstream

KEY = "sk-test-key-0001"


async def test_the_fault_player_announces_each_fault_on_and_off(make_gateway: MakeGateway) -> None:
    aws, gcp = FakeUpstream("aws"), FakeUpstream("gcp")
    gw = await make_gateway({"aws": [aws], "gcp": [gcp]}, api_keys=[{"key": KEY}])
    scenario = Scenario.model_validate(
        {"name": "blip", "duration": 1.0, "faults": [{"kind": "refuse", "target": {"provider": "aws"},
                                                       "at": "20%", "for": "40%"}]}
    )  # fmt: skip
    endpoints = gw.gateway.endpoints
    spans = build_timeline(scenario, endpoints, duration=1.0)
    ports = {"aws": aws.port, "gcp": gcp.port}
    proxies = {e.id: FaultProxy("127.0.0.1", ports[e.provider], name=e.id) for e in endpoints}
    for proxy in proxies.values():
        await proxy.start()
    announcer = DrillAnnouncer(gw.root, KEY, "blip-test")
    try:
        assert await announcer.send("start", scenario="blip", duration=1.0)
        switches: list[tuple[float, str, str]] = []
        on: set[str] = set()
        began = time.time()
        await _play(spans, proxies, time.monotonic(), time.monotonic, switches, announcer, on)
        assert await announcer.send("end")
    finally:
        await announcer.close()
        for proxy in proxies.values():
            await proxy.stop()
    assert [eid for _, eid, _ in switches] == ["aws/r1/pool/0", "aws/r1/pool/0"] and on == set()
    async with httpx.AsyncClient(base_url=gw.root, headers={"authorization": f"Bearer {KEY}"}) as http:
        drill = (await http.get("/dashboard/state")).json()["drill"]
    assert drill["id"] == "blip-test" and drill["scenario"] == "blip" and drill["duration"] == 1.0
    [fault] = drill["faults"]
    assert fault["target"] == "aws" and fault["mode"] == spans[0].kind
    [(on_at, off_at)] = fault["windows"]
    # On about 0.2 s into the drill, off about 0.4 s later, in the gateway's clock.
    assert 0.15 < on_at - began < 0.6 and 0.3 < off_at - on_at < 0.8, (on_at - began, off_at - on_at)
    assert drill["ended"] >= off_at


async def test_a_gateway_without_a_dashboard_costs_the_drill_one_warning(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await make_gateway({"aws": [FakeUpstream("a")]}, observability={"dashboard": False})
    announcer = DrillAnnouncer(gw.root, None, "x")
    try:
        assert not await announcer.send("start")
        assert not await announcer.send("end")
    finally:
        await announcer.close()
    warnings = [r for r in caplog.records if "did not take the drill" in r.getMessage()]
    assert len(warnings) == 1 and "HTTP 404" in warnings[0].getMessage()
