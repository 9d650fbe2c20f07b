"""Active health: the stall watchdog, probes that readmit, load signals, and whole-domain ejection."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time

from skyfabric.drills.faultproxy import FaultMode
from skyfabric.gateway.balancer import EndpointState
from skyfabric.gateway.health import HealthChecker, parse_load, stalled
from tests.conftest import MakeGateway, RunningGateway
from tests.gateway.test_balancer import endpoint
from tests.support.counters import assert_released
from tests.support.fake_upstream import FakeUpstream, expected_text
from tests.support.faulted import Proxied
from tests.support.wire_upstream import WireUpstream

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
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding -= 1000
    await assert_released(gw.gateway.proxy)


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
    from skyfabric.protocols.canonical import CanonicalRequest

    request = CanonicalRequest(protocol="openai.chat", model="m")
    ctx = RequestContext("chat", {}, b"", "m", False, proxy.clock() + 10, request, gw.gateway.openai)
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
    await assert_released(proxy)


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


async def _stream_with_gaps(gw: RunningGateway) -> tuple[str, float]:
    """(text, longest silence between two content chunks as the client saw it) of one streamed chat."""
    async with gw.client() as client:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True
        )
        text, last, gap = "", time.monotonic(), 0.0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                now = time.monotonic()
                gap, last = max(gap, now - last), now
                text += chunk.choices[0].delta.content
        return text, gap


async def test_slow_probes_of_a_blackholed_provider_do_not_delay_the_stall_watchdog(
    make_gateway: MakeGateway,
) -> None:
    # A blackhole freezes streams and makes every probe time out (1 s here). The watchdog must still
    # find the silence within `stall` (0.5 s): probes run beside it, and their wait is not its lag.
    aws = await Proxied.start(FakeUpstream("aws", tokens=40))
    gcp = FakeUpstream("gcp", tokens=40)
    for up in (aws.upstream, gcp):
        up.token_delay = 0.03
    try:
        gw = await make_gateway(
            {"aws": [aws], "gcp": [gcp]},
            timeouts=SLOW_IDLE,
            health={"stall": 0.5, "probe_interval": 0.3, "probe_timeout": 1.0},
        )
        proxy = gw.gateway.proxy
        proxy.states["gcp/r1/pool/0"].outstanding += 1000  # every stream starts on aws
        streams = [asyncio.ensure_future(_stream_with_gaps(gw)) for _ in range(4)]
        while proxy.states["aws/r1/pool/0"].streaming < 4:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        proxy.states["gcp/r1/pool/0"].outstanding -= 1000
        await aws.fault(FaultMode(blackhole=True))
        results = await asyncio.gather(*streams)
        assert all(text == expected_text(40) for text, _ in results)
        worst = max(gap for _, gap in results)
        assert worst < 1.2, worst  # stall 0.5 s + a tick + the continuation; not ~3 probe timeouts
        assert proxy.metrics.rescued._value.get() == 4
        await assert_released(proxy)
    finally:
        await aws.stop()


async def test_probes_run_in_tasks_of_their_own_bounded_and_cancelled_when_the_loop_stops(
    make_gateway: MakeGateway,
) -> None:
    hole = await Proxied.start(FakeUpstream("hole"))
    try:
        gw = await make_gateway(
            {"aws": [hole], "gcp": [FakeUpstream("ok")]},
            health={"probe_interval": 3600, "probe_timeout": 0.3},
        )
        proxy = gw.gateway.proxy
        await hole.fault(FaultMode(blackhole=True))
        checker = HealthChecker(proxy)
        state = proxy.states["aws/r1/pool/0"]
        failures = state.failures
        started = time.monotonic()
        await checker.probe(state)  # the whole probe is bounded by probe_timeout
        assert 0.25 < time.monotonic() - started < 0.6
        assert state.failures > failures  # and counted as a failure
        loop = asyncio.get_running_loop()
        ticks: list[float] = []
        checker.watch_stalls = lambda now: ticks.append(loop.time())  # type: ignore[method-assign]
        checker.health = checker.health.model_copy(update={"probe_timeout": 30.0})
        running = loop.create_task(checker.run())
        await asyncio.sleep(0.5)
        # the probe of the blackhole hangs (30 s) while the loop keeps ticking every 0.1 s
        assert "aws/r1/pool/0" in checker.probes and not checker.probes["aws/r1/pool/0"].done()
        assert len(ticks) >= 4 and max(b - a for a, b in itertools.pairwise(ticks)) < 0.3
        probe = checker.probes["aws/r1/pool/0"]
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        assert probe.cancelled() and not checker.probes  # no probe outlives its checker
    finally:
        await hole.stop()


async def test_a_client_that_stops_reading_does_not_get_a_healthy_endpoint_ejected(
    make_gateway: MakeGateway,
) -> None:
    # 16 KB chunks as fast as the gateway takes them; the client reads the first bytes, then nothing
    aws = WireUpstream("aws", tokens=100_000, per_chunk=4, pad=4000)
    gcp = WireUpstream("gcp", tokens=3)
    gw = await make_gateway(
        {"aws": [aws], "gcp": [gcp]}, timeouts=SLOW_IDLE, health={"stall": 0.3, "probe_interval": 0}
    )
    proxy = gw.gateway.proxy
    state = proxy.states["aws/r1/pool/0"]
    proxy.states["gcp/r1/pool/0"].outstanding += 1000
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", gw.port))
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True})
    await loop.sock_sendall(
        sock,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body.encode()),
    )
    first = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
    assert first.startswith(b"HTTP/1.1 200")
    try:
        seen, give_up = aws.requests[0], time.monotonic() + 10
        while seen.gone_at is None and time.monotonic() < give_up:
            if seen.blocked_since is not None and time.monotonic() - seen.blocked_since > 1.0:
                break  # the upstream has been unable to write for 1 s (3 × stall) …
            await asyncio.sleep(0.05)
        assert seen.gone_at is None, "the gateway dropped the upstream request for its client's slowness"
        assert seen.blocked_since is not None, "the upstream was never held up: the test proves nothing"
        assert state.streaming == 1
        assert state.available(proxy.clock()), "ejected for its client's back-pressure"
        assert proxy.metrics.rescued._value.get() == 0 and seen.gone_at is None
        assert not any(s.ejections for s in proxy.states.values())
    finally:
        sock.close()  # … then the client is dropped (what the listener's write timeout does)
    dropped = time.monotonic()
    gone = await aws.wait_gone(aws.requests[0], 2.0)
    assert gone is not None and gone - dropped < 0.5  # the upstream request is stopped with it
    proxy.states["gcp/r1/pool/0"].outstanding -= 1000
    await assert_released(proxy)
    proxy.states["gcp/r1/pool/0"].outstanding += 1000
    async with gw.client() as client:  # and the endpoint still serves
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
    proxy.states["gcp/r1/pool/0"].outstanding -= 1000
    assert raw.headers["x-skyfabric-backend"] == "aws/r1/pool/0"
    assert raw.parse().choices[0].message.content == aws.text(2)


async def test_whole_answers_stuck_on_an_endpoint_that_fails_its_probe_are_moved(
    make_gateway: MakeGateway,
) -> None:
    # Found by `skyfabric simulate`: aws is ejected for another request's failure (not by the health loop),
    # then blackholed. A non-streaming request already in flight there is seen by no stall watchdog; before,
    # it waited out its response timeout (30 s here, 120 s by default). The failed half-open probe moves it.
    aws = await Proxied.start(FakeUpstream("a", tokens=3, default={"delay": 0.5}))
    gcp = FakeUpstream("b", tokens=3)
    gw = await make_gateway(
        {"aws": [aws], "gcp": [gcp]},
        timeouts={
            "connect": 0.5,
            "first_byte": 30,
            "first_token": 30,
            "idle": 30,
            "response": 30,
            "total": 60,
        },
        health={"probe_interval": 0.2, "probe_timeout": 0.3, "base_ejection": 0.3, "load_signals": False},
    )
    proxy = gw.gateway.proxy
    proxy.states["gcp/r1/pool/0"].outstanding = 1000  # the request goes to aws
    started = time.monotonic()
    task = asyncio.ensure_future(
        gw.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    )
    await asyncio.sleep(0.2)
    proxy.states["gcp/r1/pool/0"].outstanding -= 1000
    await aws.fault(FaultMode(blackhole=True))
    state = proxy.states["aws/r1/pool/0"]
    assert state.inflight  # the whole answer is on its way from aws
    from skyfabric.gateway.balancer import eject

    eject(state, proxy.clock(), proxy.outlier)  # what another request's connect error does
    proxy.after_ejection(state, "connect refused")  # a single failure: its neighbours are left alone
    completion = await asyncio.wait_for(task, 10)
    took = time.monotonic() - started
    assert completion.choices[0].message.content == expected_text(3)
    assert took < 3.0, took  # the probe's ejection time and timeout, not the 30 s response timeout
    assert len(gcp.requests) == 1
    await assert_released(proxy)
