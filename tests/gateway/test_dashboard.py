"""The dashboard over real HTTP: its credential, its headers, and what its event stream says."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson

from skyfabric.gateway.observe import Observer
from tests.conftest import MakeGateway
from tests.support.fake_upstream import FakeUpstream

KEY = "sk-test-key-0001"
AUTH = {"authorization": f"Bearer {KEY}"}


class EventReader:
    """The named events of one SSE response, read on demand."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.aiter_lines()

    async def next(self, n: int, timeout: float = 5.0) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        name = "message"

        async def collect() -> None:
            nonlocal name
            async for line in self.lines:
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, orjson.loads(line[6:])))
                    if len(events) == n:
                        return

        await asyncio.wait_for(collect(), timeout)
        return events


async def test_dashboard_needs_a_key_and_sets_security_headers(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"aws": [FakeUpstream("a")]}, api_keys=[{"key": KEY}])
    async with httpx.AsyncClient(base_url=gw.root) as http:
        page = await http.get("/dashboard")
        assert page.status_code == 401 and 'action="/dashboard/login"' in page.text
        for path in ("/dashboard/state", "/dashboard/events"):
            assert (await http.get(path)).status_code == 401
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp

        bad = await http.post("/dashboard/login", data={"key": "sk-wrong-key-00"})
        assert bad.status_code == 401 and "not valid" in bad.text
        good = await http.post("/dashboard/login", data={"key": KEY})
        assert good.status_code == 303 and good.headers["location"] == "/dashboard"
        cookie = good.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and KEY not in cookie
        page = await http.get("/dashboard")  # the client kept the cookie
        assert page.status_code == 200 and "/dashboard/app.js" in page.text
        js = await http.get("/dashboard/app.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert "EventSource" in js.text and "http" not in js.text.replace("http://www.w3.org/2000/svg", "")


async def test_state_shows_the_tree_and_the_cause_of_an_ejection(make_gateway: MakeGateway) -> None:
    down = FakeUpstream("down", default="reset")
    gw = await make_gateway(
        {"aws": {"us-east": [down]}, "gcp": {"eu-west": [FakeUpstream("b"), FakeUpstream("c")]}},
        health={"probe_interval": 0, "base_ejection": 60},  # still out when the test looks, however slow
    )
    client = gw.client()
    for _ in range(4):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    async with httpx.AsyncClient(base_url=gw.root) as http:
        state = (await http.get("/dashboard/state")).json()
    assert [p["name"] for p in state["topology"]] == ["aws", "gcp"]
    aws = state["topology"][0]["regions"][0]
    assert aws["name"] == "us-east" and aws["pools"][0]["accelerator"] == "cpu"
    [endpoint] = aws["pools"][0]["endpoints"]
    assert endpoint["id"] == "aws/us-east/pool/0" and endpoint["health"] == "down"
    assert endpoint["cause"] == "upstream connection lost: upstream closed the connection"
    assert state["summary"] == {"aws": "down", "gcp": "up"}
    kinds = [item["kind"] for item in state["feed"]]
    assert "ejection" in kinds and "failover" in kinds
    assert state["feed"][kinds.index("ejection")]["endpoint"] == "aws/us-east/pool/0"


async def test_event_stream_sends_history_then_ticks_with_exact_counts(make_gateway: MakeGateway) -> None:
    broken = FakeUpstream("b", tokens=5).then({"status": 503})
    gw = await make_gateway(
        {"aws": [FakeUpstream("a", tokens=5)], "gcp": [broken]},
        observability={"dashboard_interval": 0.2},
        health={"probe_interval": 0},
    )
    http = httpx.AsyncClient(base_url=gw.root, timeout=10)
    async with http, http.stream("GET", "/dashboard/events") as response:
        assert response.headers["content-type"] == "text/event-stream"
        events = EventReader(response)
        [(name, hello)] = await events.next(1)
        assert name == "hello" and hello["summary"] == {"aws": "up", "gcp": "up"} and hello["feed"] == []
        client = gw.client()
        for _ in range(4):
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], stream=True
            )
            async for _chunk in stream:
                pass
        ticks = await events.next(3)
        while sum(p[2] for _, t in ticks for p in t["points"].values()) < 4:
            ticks += await events.next(1)
        ticks += await events.next(1)  # one more: nothing else arrives
    assert {name for name, _ in ticks} == {"tick"}
    aws = [tick["points"]["aws"] for _, tick in ticks]
    gcp = [tick["points"]["gcp"] for _, tick in ticks]
    # [time, seconds, attempts, failed, ttft p50, ttft p99, tokens]: 4 streams of 5 tokens; gcp's first
    # answer is a 503 (whether the balancer sent one of the four there is its random choice).
    failed = sum(p[3] for p in gcp)
    assert failed == min(1, len(broken.requests))
    assert sum(p[3] for p in aws) == 0
    assert sum(p[2] for p in aws + gcp) == 4 + failed
    assert sum(p[6] for p in aws + gcp) == 20
    assert all(0 < p[4] <= p[5] < 5 for p in aws + gcp if p[4] is not None)
    feed = [item for _, tick in ticks for item in tick["feed"]]
    assert [item["kind"] for item in feed].count("failover") == failed


async def test_closed_dashboards_stop_the_ticker(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"aws": [FakeUpstream("a")]}, observability={"dashboard_interval": 0.1})
    hub = gw.gateway.dashboard.hub  # type: ignore[union-attr]
    async with httpx.AsyncClient(base_url=gw.root, timeout=10) as http:
        for _ in range(3):
            async with http.stream("GET", "/dashboard/events") as response:
                await EventReader(response).next(2)
    for _ in range(50):
        if not hub.subscribers and hub._task is None:
            break
        await asyncio.sleep(0.05)
    assert not hub.subscribers and hub._task is None


async def test_dashboard_can_be_turned_off(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(
        {"aws": [FakeUpstream("a")]}, observability={"dashboard": False, "metrics": False}
    )
    async with httpx.AsyncClient(base_url=gw.root) as http:
        assert (await http.get("/dashboard")).status_code == 404
        assert "gen_ai_client" not in (await http.get("/metrics")).text
    assert type(gw.gateway.proxy.observer) is Observer  # all off: the no-op observer
