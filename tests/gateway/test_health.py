"""Active health: the stall watchdog, probes that readmit, load signals, and whole-domain ejection."""

from __future__ import annotations

import asyncio
import time

from skyfabric.gateway.balancer import EndpointState
from skyfabric.gateway.health import HealthChecker, parse_load, stalled
from tests.conftest import MakeGateway
from tests.gateway.test_balancer import endpoint
from tests.support.fake_upstream import FakeUpstream, expected_text

SLOW_IDLE = {"connect": 0.5, "first_byte": 5, "first_token": 5, "idle": 5, "response": 5, "total": 20}


def test_stalled_is_a_function_of_time() -> None:
    state = EndpointState(endpoint("aws"))
    state.last_activity = 10.0
    assert not stalled(state, 20.0, 0.8)  # nothing committed there: silence means nothing
    state.streaming = 2
    assert not stalled(state, 10.5, 0.8)
    assert stalled(state, 10.9, 0.8)


async def test_silent_provider_is_detected_in_under_a_second_and_its_streams_rescued(
    make_gateway: MakeGateway,
) -> None:
    # aws goes silent mid-answer for every stream (a blackhole: no error, no bytes); idle timeout is 5 s
    aws = FakeUpstream("aws", tokens=12, default={"stall_after": 4})
    gcp = FakeUpstream("gcp", tokens=12)
    for up in (aws, gcp):
        up.token_delay = 0.02
    gw = await make_gateway(
        {"aws": [aws], "gcp": [gcp]}, timeouts=SLOW_IDLE, health={"stall": 0.4, "probe_interval": 0}
    )
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding = 1000  # every stream starts on aws
    client = gw.client()

    async def one() -> tuple[str, float]:
        started = time.monotonic()
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return text, time.monotonic() - started

    results = await asyncio.gather(*[one() for _ in range(6)])
    assert all(text == expected_text(12) for text, _ in results)
    slowest = max(seconds for _, seconds in results)
    assert slowest < 2.0, slowest  # the watchdog (0.4 s), not the 5 s idle timeout, moved them
    assert gw.gateway.proxy.metrics.rescued._value.get() == 6
    assert not gw.gateway.proxy.states["aws/r1/pool/0"].available(gw.gateway.proxy.clock())


async def test_probe_keeps_a_dead_endpoint_out_and_readmits_it_when_back(make_gateway: MakeGateway) -> None:
    flaky, steady = FakeUpstream("flaky"), FakeUpstream("steady")
    gw = await make_gateway(
        {"aws": [flaky], "gcp": [steady]},
        health={"probe_interval": 3600, "base_ejection": 0.01},  # probes on, run by hand
    )
    proxy = gw.gateway.proxy
    state = proxy.states["aws/r1/pool/0"]
    checker = HealthChecker(proxy)
    port = flaky.port
    await flaky.stop()  # down: connection refused
    await checker.probe(state)
    assert not state.available(proxy.clock())
    await asyncio.sleep(0.05)
    await checker.probe(state)  # half-open probe fails: stays out, ejected again
    assert state.needs_probe and state.ejections >= 2
    flaky.port = port
    flaky._stopping = asyncio.Event()
    await flaky.start()  # back on the same port
    await asyncio.sleep(state.ejected_until - proxy.clock() + 0.01)
    await checker.probe(state)
    assert state.available(proxy.clock()) and not state.needs_probe


async def test_load_signals_from_vllm_metrics_steer_the_balancer() -> None:
    text = (
        b"# HELP vllm:num_requests_running x\n"
        b'vllm:num_requests_running{model_name="m",engine="0"} 3.0\n'
        b'vllm:num_requests_running{model_name="m",engine="1"} 2.0\n'
        b'vllm:num_requests_waiting{model_name="m"} 7.0\n'
        b'vllm:kv_cache_usage_perc{model_name="m"} 0.25\n'
    )
    load = parse_load(text)
    assert load == {
        b"vllm:num_requests_running": 5.0,
        b"vllm:num_requests_waiting": 7.0,
        b"vllm:kv_cache_usage_perc": 0.25,
    }
    busy, idle = EndpointState(endpoint("aws", 0)), EndpointState(endpoint("gcp", 1))
    busy.reported_waiting = 7.0
    idle.outstanding = 3  # we sent it more, but it says it queues nothing
    from skyfabric.gateway.balancer import Cluster

    assert Cluster("m", [busy, idle]).pick(0.0) is idle


async def test_losing_half_a_provider_ejects_the_rest_of_it(make_gateway: MakeGateway) -> None:
    aws = [FakeUpstream(f"aws{i}") for i in range(4)]
    gcp = [FakeUpstream("gcp")]
    gw = await make_gateway({"aws": aws, "gcp": gcp}, health={"probe_interval": 0})
    proxy = gw.gateway.proxy
    from skyfabric.core.errors import ConnectError
    from skyfabric.gateway.context import RequestContext

    ctx = RequestContext("chat", {}, b"", "m", False, proxy.clock() + 10)
    proxy.note_failure(ctx, proxy.states["aws/r1/pool/0"], ConnectError("refused"))
    assert sum(s.available(proxy.clock()) for s in proxy.states.values()) == 4
    proxy.note_failure(ctx, proxy.states["aws/r1/pool/1"], ConnectError("refused"))
    available = {s.endpoint.id for s in proxy.states.values() if s.available(proxy.clock())}
    assert available == {"gcp/r1/pool/0"}


async def test_all_endpoints_silent_at_once_is_not_an_outage(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(
        {"aws": [FakeUpstream("a")], "gcp": [FakeUpstream("b")]}, health={"stall": 0.5, "probe_interval": 0}
    )
    proxy = gw.gateway.proxy
    checker = HealthChecker(proxy)
    for state in proxy.states.values():
        state.streaming, state.last_activity = 1, 0.0
    checker.watch_stalls(10.0)  # both silent: our own pause or network, not two clouds at once
    assert all(s.available(10.0) for s in proxy.states.values())
    proxy.states["gcp/r1/pool/0"].last_activity = 9.9
    checker.watch_stalls(10.0)  # only aws silent while gcp streams: aws is out
    assert not proxy.states["aws/r1/pool/0"].available(10.0)
    assert proxy.states["gcp/r1/pool/0"].available(10.0)
    for state in proxy.states.values():
        state.streaming = 0


async def test_probe_ejection_moves_requests_stuck_in_a_blackhole(make_gateway: MakeGateway) -> None:
    hole = FakeUpstream("hole", tokens=3, default="hang")
    good = FakeUpstream("good", tokens=3)
    gw = await make_gateway(
        {"aws": [hole], "gcp": [good]},
        timeouts={"connect": 1, "first_byte": 30, "first_token": 30, "idle": 30, "response": 30, "total": 60},
        health={"probe_interval": 0, "consecutive_failures": 1},
    )
    proxy = gw.gateway.proxy
    proxy.states["gcp/r1/pool/0"].outstanding = 1000
    started = time.monotonic()
    task = asyncio.ensure_future(
        gw.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    )
    await asyncio.sleep(0.3)
    proxy.states["gcp/r1/pool/0"].outstanding -= 1000
    proxy.after_ejection(proxy.states["aws/r1/pool/0"], "probe: timed out")  # what a failed probe does
    completion = await asyncio.wait_for(task, 5)
    assert completion.choices[0].message.content == expected_text(3)
    assert time.monotonic() - started < 3  # not the 30 s response timeout


async def test_fleet_wide_outage_holds_requests_until_an_endpoint_is_back(make_gateway: MakeGateway) -> None:
    a, b = FakeUpstream("a", tokens=2), FakeUpstream("b", tokens=2)
    gw = await make_gateway({"aws": [a], "gcp": [b]}, health={"probe_interval": 0, "base_ejection": 0.4})
    proxy = gw.gateway.proxy
    from skyfabric.gateway.balancer import eject

    for state in proxy.states.values():
        eject(state, proxy.clock(), proxy.outlier)  # the gateway's own network blinked: everything is out
    started = time.monotonic()
    completion = await gw.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}]
    )
    waited = time.monotonic() - started
    assert completion.choices[0].message.content == expected_text(2)
    assert 0.3 < waited < 2.0  # held until the ejection ran out, then served; not failed, not sent blind
    assert len(a.requests) + len(b.requests) == 1
