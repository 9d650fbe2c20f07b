"""Each upstream fault, against fake upstreams: what the client sees and what it costs upstream."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest

from skyfabric.drills.faultproxy import FaultMode
from skyfabric.gateway.health import HealthChecker
from tests.conftest import MakeGateway, RunningGateway
from tests.support.counters import assert_released
from tests.support.fake_upstream import FakeUpstream, expected_text
from tests.support.faulted import Proxied

FAST = {"connect": 0.5, "first_byte": 0.5, "first_token": 0.5, "idle": 0.4, "response": 1.0, "total": 10}


async def chat(gw: RunningGateway, *, stream: bool, **kwargs: Any) -> tuple[str, str | None, dict[str, Any]]:
    """(text, finish_reason, headers) of one chat request through the SDK."""
    client = gw.client()
    messages = [{"role": "user", "content": "write code"}]
    if not stream:
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=messages, **kwargs)
        completion = raw.parse()
        return (
            completion.choices[0].message.content or "",
            completion.choices[0].finish_reason,
            dict(raw.headers),
        )
    text, reason = "", None
    async with client.chat.completions.with_streaming_response.create(
        model="m", messages=messages, stream=True, **kwargs
    ) as resp:
        async for chunk in await resp.parse():
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        return text, reason, dict(resp.headers)


async def in_flight(gw: RunningGateway, settle: float = 1.0) -> dict[str, Any]:
    """(outstanding, streaming) per endpoint and the admitted count, once they are zero or ``settle`` s on.

    The client has its last byte a moment before the gateway's own bookkeeping after it: a short wait keeps
    the check from racing it, and a leak still shows.
    """
    proxy = gw.gateway.proxy
    deadline = time.monotonic() + settle
    while True:
        gate = proxy.admission.gates.get("m")
        seen: dict[str, Any] = {k: (s.outstanding, s.streaming) for k, s in proxy.states.items()}
        seen["admitted"] = gate.inflight if gate is not None else 0
        if not any(v != (0, 0) and v != 0 for v in seen.values()) or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(0.01)


_BEFORE_FIRST_TOKEN = [
    ({"status": 500}, "500"),
    ({"status": 503}, "503"),
    ("reset", "reset-before-headers"),
    ("hang", "no-response"),
    ("hang_after_headers", "hang-after-headers"),
    ({"status": 429}, "429-no-retry-after"),
]


@pytest.mark.parametrize(
    ("stream", "fault"),
    [(s, f) for f, _ in _BEFORE_FIRST_TOKEN for s in (False, True)]
    + [(True, {"slow_first_token": 2.0}), (False, "hang_mid_body")],
    ids=[f"{i}-{'stream' if s else 'whole'}" for _, i in _BEFORE_FIRST_TOKEN for s in (False, True)]
    + ["slow-first-token-stream", "hang-mid-body-whole"],
)
async def test_fault_before_first_token_is_retried_elsewhere(
    make_gateway: MakeGateway, stream: bool, fault: Any
) -> None:
    bad, good = FakeUpstream("bad", tokens=5).then(fault), FakeUpstream("good", tokens=5)
    gw = await make_gateway({"aws": [bad], "gcp": [good]}, timeouts=FAST)
    # pin the first attempt on the faulty provider
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding = 1000
    started = time.monotonic()
    text, reason, headers = await chat(gw, stream=stream)
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding -= 1000
    assert (text, reason) == (expected_text(5), "stop")
    assert headers["x-skyfabric-backend"].startswith("gcp/")
    assert len(bad.requests) == 1 and len(good.requests) == 1
    assert time.monotonic() - started < 3.0  # abandoned within its phase timeout, not the 10 s deadline
    # what the request took is given back: nothing is left in flight on either endpoint, or in admission
    assert await in_flight(gw) == {"aws/r1/pool/0": (0, 0), "gcp/r1/pool/0": (0, 0), "admitted": 0}
    await assert_released(gw.gateway.proxy)


async def test_persistent_503_ejects_the_endpoint(make_gateway: MakeGateway) -> None:
    bad, good = FakeUpstream("bad", default={"status": 503}), FakeUpstream("good", tokens=2)
    gw = await make_gateway({"aws": [bad], "gcp": [good]}, timeouts=FAST)
    gw.gateway.proxy.clock = lambda: 1000.0  # time stands still: the ejection cannot run out mid-test
    for _ in range(12):
        text, _, _ = await chat(gw, stream=False)
        assert text == expected_text(2)
    # three consecutive failures eject it: it sees at most a few requests, not one in two
    assert len(bad.requests) <= 4
    state = gw.gateway.proxy.states["aws/r1/pool/0"]
    assert state.ejections >= 1


async def test_429_with_retry_after_cools_the_provider(make_gateway: MakeGateway) -> None:
    throttled = FakeUpstream("throttled").then({"status": 429, "retry_after": 30})
    good = FakeUpstream("good", tokens=2)
    gw = await make_gateway({"aws": [throttled], "gcp": [good]}, timeouts=FAST)
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding = 1000
    await chat(gw, stream=False)
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding -= 1000
    for _ in range(5):
        await chat(gw, stream=False)
    assert len(throttled.requests) == 1  # not asked again while it cools
    cooled = gw.gateway.proxy.cooldowns["aws"] - time.monotonic()
    assert 25 < cooled <= 30


async def test_everyone_throttling_gives_429_with_retry_after(make_gateway: MakeGateway) -> None:
    a = FakeUpstream("a", default={"status": 429, "retry_after": 7})
    b = FakeUpstream("b", default={"status": 429, "retry_after": 7})
    gw = await make_gateway({"aws": [a], "gcp": [b]}, timeouts=FAST)
    async with httpx.AsyncClient() as http:
        resp = await http.post(
            f"{gw.base_url}/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
        )
    assert resp.status_code == 429
    assert resp.headers["retry-after"] == "7"
    assert resp.json()["error"]["type"] == "rate_limit_error"


async def test_client_errors_are_not_retried(make_gateway: MakeGateway) -> None:
    bad = FakeUpstream("bad", default={"status": 422})
    good = FakeUpstream("good")
    gw = await make_gateway({"aws": [bad], "gcp": [good]}, timeouts=FAST)
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding = 1000
    with pytest.raises(openai.UnprocessableEntityError):
        await chat(gw, stream=False)
    assert len(good.requests) == 0


async def test_content_filter_keeps_the_providers_reason_and_is_not_retried(
    make_gateway: MakeGateway,
) -> None:
    bad = FakeUpstream("bad", default="content_filter")
    good = FakeUpstream("good")
    gw = await make_gateway({"aws": [bad], "gcp": [good]}, timeouts=FAST)
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding = 1000
    with pytest.raises(openai.BadRequestError) as info:
        await chat(gw, stream=True)
    assert "reason: violence" in str(info.value)
    assert info.value.code == "content_policy_violation"
    assert len(good.requests) == 0


async def test_context_length_goes_to_the_larger_context_model(make_gateway: MakeGateway) -> None:
    small = FakeUpstream("small", default="context_length")
    big = FakeUpstream("big", tokens=3)
    big.model = "m-long"
    models = [{"name": "m", "larger_context": "m-long"}, {"name": "m-long"}]
    gw = await make_gateway({"aws": [small], "gcp": [big]}, models=models, timeouts=FAST)
    text, _, headers = await chat(gw, stream=False)
    assert text == expected_text(3)
    assert headers["x-skyfabric-model"] == "m-long"


async def test_context_length_without_a_larger_model_fails_at_once(make_gateway: MakeGateway) -> None:
    small = FakeUpstream("small", default="context_length")
    other = FakeUpstream("other", default="context_length")
    gw = await make_gateway({"aws": [small], "gcp": [other]}, timeouts=FAST)
    with pytest.raises(openai.BadRequestError) as info:
        await chat(gw, stream=False)
    assert "maximum context length" in str(info.value)
    assert len(small.requests) + len(other.requests) == 1


async def test_fallback_model_answers_when_the_primary_cannot(make_gateway: MakeGateway) -> None:
    primary = FakeUpstream("primary", default={"status": 503})
    backup = FakeUpstream("backup", tokens=2)
    backup.model = "m-backup"
    models = [{"name": "m", "fallbacks": ["m-backup"]}, {"name": "m-backup"}]
    gw = await make_gateway({"aws": [primary], "gcp": [backup]}, models=models, timeouts=FAST)
    text, _, headers = await chat(gw, stream=False)
    assert text == expected_text(2) and headers["x-skyfabric-model"] == "m-backup"


async def test_total_deadline_is_never_exceeded(make_gateway: MakeGateway) -> None:
    a, b = FakeUpstream("a", default="hang"), FakeUpstream("b", default="hang")
    gw = await make_gateway({"aws": [a], "gcp": [b]}, timeouts={**FAST, "response": 30})
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=10) as http:
        resp = await http.post(
            f"{gw.base_url}/chat/completions",
            headers={"x-skyfabric-deadline": "0.8"},
            json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
        )
    elapsed = time.monotonic() - started
    assert resp.status_code == 504  # the client's deadline ran out: a gateway timeout, not a bad gateway
    assert "deadline passed" in resp.json()["error"]["message"]
    assert elapsed < 1.2
    await assert_released(gw.gateway.proxy)


async def test_flapping_primary_is_readmitted_after_its_ejection(make_gateway: MakeGateway) -> None:
    flappy = FakeUpstream("flappy", tokens=2).then("reset")
    steady = FakeUpstream("steady", tokens=2)
    gw = await make_gateway({"aws": [flappy], "gcp": [steady]}, timeouts=FAST)
    clock = [1000.0]
    gw.gateway.proxy.clock = lambda: clock[0]
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding = 1000
    await chat(gw, stream=False)  # flappy resets → ejected, steady answers
    assert not gw.gateway.proxy.states["aws/r1/pool/0"].available(clock[0])
    await chat(gw, stream=False)
    assert len(flappy.requests) == 1  # still ejected
    clock[0] += 60
    assert not gw.gateway.proxy.states["aws/r1/pool/0"].available(clock[0])  # half-open: waits for a probe
    await HealthChecker(gw.gateway.proxy).probe(gw.gateway.proxy.states["aws/r1/pool/0"])
    clock[0] += 60  # past the slow start
    text, _, headers = await chat(gw, stream=False)  # back up: it takes traffic again
    assert headers["x-skyfabric-backend"].startswith("aws/") and text == expected_text(2)


async def test_retry_budget_caps_retries_during_an_outage(make_gateway: MakeGateway) -> None:
    down = FakeUpstream("down", default={"status": 503, "delay": 0.2})
    up = FakeUpstream("up", tokens=1, default={"delay": 0.2})
    retry = {"max_attempts": 3, "budget_percent": 20, "min_retry_concurrency": 2}
    gw = await make_gateway(
        {"aws": [down], "gcp": [up]},
        timeouts=FAST,
        retry=retry,
        health={"consecutive_failures": 1000, "probe_interval": 0},
    )
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding = 1000  # every first attempt lands on the outage
    async with httpx.AsyncClient(timeout=10) as http:
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        results = await asyncio.gather(
            *[http.post(f"{gw.base_url}/chat/completions", json=body) for _ in range(20)]
        )
    ok = sum(r.status_code == 200 for r in results)
    assert len(down.requests) == 20
    # retries in flight were capped at max(2, 20 % of 20 in flight) = 4, not one per failed request
    assert 1 <= ok <= 8, ok
    assert gw.gateway.proxy.budget.refused >= 12
    refused = next(r for r in results if r.status_code != 200)
    assert "retry budget exhausted" in refused.json()["error"]["message"]
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding -= 1000
    await assert_released(gw.gateway.proxy)


async def test_accounting_names_who_answered_and_bills_only_what_reached_the_client(
    make_gateway: MakeGateway,
) -> None:
    first = FakeUpstream("first", tokens=6).then({"cut_after": 3})
    second = FakeUpstream("second", tokens=6)
    first.token_delay = 0.01
    gw = await make_gateway({"aws": [first], "gcp": [second]}, timeouts=FAST)
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding = 1000
    _, _, headers = await chat(gw, stream=True, stream_options={"include_usage": True})
    assert headers["x-skyfabric-backend"] == "aws/r1/pool/0"  # who began it (headers go out first)
    bad = FakeUpstream("bad", default={"status": 500})
    gw2 = await make_gateway({"aws": [bad], "gcp": [FakeUpstream("good", tokens=2)]}, timeouts=FAST)
    gw2.gateway.proxy.states["gcp/r1/pool/0"].outstanding = 1000
    _, _, headers2 = await chat(gw2, stream=False)
    assert headers2["x-skyfabric-backend"] == "gcp/r1/pool/0"  # the retry answered, and says so
    text = gw2.gateway.proxy.metrics.render().decode()
    assert 'skyfabric_requests_total{model="m",status="200"} 1.0' in text  # one request, not two
    assert 'skyfabric_attempts_total{endpoint="aws/r1/pool/0",outcome="status_500"} 1.0' in text
    assert 'skyfabric_attempts_total{endpoint="gcp/r1/pool/0",outcome="ok"} 1.0' in text


async def test_requests_caught_in_a_blackhole_are_not_resent_into_it(make_gateway: MakeGateway) -> None:
    # aws is blackholed (its kernel still accepts). Requests sent to it just after the outage, on pooled
    # keep-alive connections, are aborted when the watchdog ejects it: they must go straight to gcp, not
    # be resent to aws as if their connection were merely stale (then wait out first_byte, 4 s here).
    aws = await Proxied.start(FakeUpstream("aws", tokens=100))
    aws.upstream.token_delay = 0.03
    gcp = FakeUpstream("gcp", tokens=100)
    patient = {"connect": 1, "first_byte": 4, "first_token": 4, "idle": 4, "response": 4, "total": 20}
    try:
        gw = await make_gateway(
            {"aws": [aws], "gcp": [gcp]}, timeouts=patient, health={"stall": 0.4, "probe_interval": 0}
        )
        proxy = gw.gateway.proxy
        proxy.states["gcp/r1/pool/0"].outstanding += 1000  # aws takes every first attempt
        aws.upstream.then(*[{"delay": 0.3}] * 8)
        await asyncio.gather(*[chat(gw, stream=False) for _ in range(8)])  # 8 keep-alive connections
        assert len(proxy.client.pool(proxy.states["aws/r1/pool/0"].endpoint.origin).idle) == 8
        long = [asyncio.ensure_future(chat(gw, stream=True)) for _ in range(2)]
        clients = [gw.client() for _ in range(6)]  # made before: making one blocks the loop for a while
        while proxy.states["aws/r1/pool/0"].streaming < 2:
            await asyncio.sleep(0.01)
        await aws.fault(FaultMode(blackhole=True))

        async def ttft(client: Any) -> tuple[float, str]:
            started = time.monotonic()
            first = None
            async with client:
                stream = await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "x"}], stream=True
                )
                text = ""
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.monotonic() - started
                        text += chunk.choices[0].delta.content
            assert first is not None
            return first, text

        results = await asyncio.gather(*[ttft(c) for c in clients])
        assert all(text == expected_text(100) for _, text in results)
        worst = max(first for first, _ in results)
        assert worst < 1.5, worst  # the watchdog's stall (0.4 s) and a retry, far from first_byte (4 s)
        assert [r[0] for r in await asyncio.gather(*long)] == [expected_text(100)] * 2
        proxy.states["gcp/r1/pool/0"].outstanding -= 1000
        await assert_released(proxy)
        await asyncio.sleep(0.1)
        # 2 frozen streams + 6 requests held once each; a resend would have been held a second time
        assert aws.proxy.counts()["hold"] == 8, aws.proxy.counts()
    finally:
        await aws.stop()
