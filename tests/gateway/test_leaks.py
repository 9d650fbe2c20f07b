"""Every way a request ends releases exactly what it took, and an abandoned upstream request is stopped.

Each test ends with :func:`~tests.support.counters.assert_released` (outstanding, streaming, tracked
upstream connections, admission slots, retry budget back to zero) and, where the gateway walked away from
an upstream request, checks that the upstream saw its client go (a real engine aborts the generation then).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest

from skyfabric.gateway.admission import Admission
from tests.conftest import MakeGateway, RunningGateway
from tests.support.counters import assert_released
from tests.support.fake_upstream import FakeUpstream, expected_text
from tests.support.wire_upstream import WireUpstream

FAST = {"connect": 0.5, "first_byte": 0.5, "first_token": 0.5, "idle": 0.4, "response": 1.0, "total": 10}
PATIENT = {"connect": 1, "first_byte": 30, "first_token": 30, "idle": 30, "response": 30, "total": 60}
MESSAGES = [{"role": "user", "content": "write code"}]


def pin(gw: RunningGateway, away_from: str = "gcp/r1/pool/0") -> None:
    """Make every first attempt land on the other endpoint (the pinned one looks busy)."""
    gw.gateway.proxy.states[away_from].outstanding += 1000


def unpin(gw: RunningGateway, away_from: str = "gcp/r1/pool/0") -> None:
    gw.gateway.proxy.states[away_from].outstanding -= 1000


@pytest.mark.parametrize("fault", ["reset_body", "hang_body"])
async def test_whole_answer_whose_body_fails_after_the_headers_releases_its_endpoint(
    make_gateway: MakeGateway, fault: str
) -> None:
    # headers arrive, then the body breaks (reset) or stops (idle timeout): retried on gcp, nothing kept
    bad, good = WireUpstream("bad", default=fault), WireUpstream("good", tokens=4)
    gw = await make_gateway({"aws": [bad], "gcp": [good]}, timeouts=FAST, health={"probe_interval": 0})
    pin(gw)
    started = time.monotonic()
    completion = await gw.client().chat.completions.create(model="m", messages=MESSAGES)
    elapsed = time.monotonic() - started
    unpin(gw)
    assert completion.choices[0].message.content == good.text(4)
    assert len(bad.requests) == 1 and len(good.requests) == 1
    assert elapsed < 1.5, elapsed  # the idle timeout (0.4 s), not the 1 s response timeout or worse
    if fault == "hang_body":
        assert await bad.wait_gone(bad.requests[0], 1.0) is not None  # its connection was closed
    await assert_released(gw.gateway.proxy)


@pytest.mark.parametrize("fault", ["hang", "hang_body"])
async def test_client_that_leaves_a_whole_answer_stops_the_upstream(
    make_gateway: MakeGateway, fault: str
) -> None:
    # the client gives up (its own timeout) while the gateway waits for the headers / for the body
    up = WireUpstream("up", default=fault)
    gw = await make_gateway({"aws": [up]}, timeouts=PATIENT, health={"probe_interval": 0})
    client = gw.client(timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="m", messages=MESSAGES)
    left = time.monotonic()
    gone = await up.wait_gone(up.requests[0], 2.0)
    assert gone is not None, "the upstream never saw the gateway give up: it would generate on"
    assert gone - left < 0.5, gone - left
    await assert_released(gw.gateway.proxy)


async def test_client_that_leaves_mid_stream_stops_the_upstream(make_gateway: MakeGateway) -> None:
    up = WireUpstream("up", tokens=300, per_chunk=2, token_delay=0.02)
    gw = await make_gateway({"aws": [up]}, timeouts=PATIENT, health={"probe_interval": 0})
    chunks = 0
    async with gw.client().chat.completions.with_streaming_response.create(
        model="m", messages=MESSAGES, stream=True
    ) as resp:
        async for chunk in await resp.parse():
            chunks += bool(chunk.choices and chunk.choices[0].delta.content)
            if chunks == 3:
                break  # leaving the block closes the connection: the client is gone
    left = time.monotonic()
    gone = await up.wait_gone(up.requests[0], 2.0)
    assert gone is not None and gone - left < 0.5
    assert not up.requests[0].finished
    await assert_released(gw.gateway.proxy)


async def test_client_that_leaves_while_its_stream_is_continued_releases_the_new_endpoint(
    make_gateway: MakeGateway,
) -> None:
    # aws breaks after 3 tokens; the continuation on gcp takes 3 s to answer; the client gives up first
    first = FakeUpstream("first", tokens=20).then({"cut_after": 3})
    slow = FakeUpstream("slow", tokens=20, default={"delay": 3})
    gw = await make_gateway({"aws": [first], "gcp": [slow]}, timeouts=PATIENT, health={"probe_interval": 0})
    pin(gw)
    text = ""
    client = gw.client(timeout=httpx.Timeout(5.0, read=0.6))
    with pytest.raises(openai.APITimeoutError):
        async with client.chat.completions.with_streaming_response.create(
            model="m", messages=MESSAGES, stream=True
        ) as resp:
            async for chunk in await resp.parse():
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    if text == expected_text(3):
                        unpin(gw)  # the continuation may now go to gcp
    assert text == expected_text(3)
    assert len(slow.requests) == 1 and slow.requests[0]["continue_final_message"]
    await assert_released(gw.gateway.proxy)


async def test_hedge_that_loses_is_stopped_and_releases_everything(make_gateway: MakeGateway) -> None:
    slow = WireUpstream("slow", tokens=4, token_delay=2.0)  # first token after 2 s
    fast = WireUpstream("fast", tokens=4)
    models = [{"name": "m", "hedge": {"after": 0.1}}]
    gw = await make_gateway(
        {"aws": [slow], "gcp": [fast]}, models=models, timeouts=PATIENT, health={"probe_interval": 0}
    )
    pin(gw)
    stream = await gw.client().chat.completions.create(model="m", messages=MESSAGES, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    unpin(gw)
    assert text == fast.text(4)
    gone = await slow.wait_gone(slow.requests[0], 1.0)
    assert gone is not None, "the losing hedge's upstream request was never stopped"
    await assert_released(gw.gateway.proxy)


@pytest.mark.parametrize("stream", [False, True])
async def test_success_error_and_deadline_release_everything(make_gateway: MakeGateway, stream: bool) -> None:
    a = WireUpstream("a", tokens=5).then("reset_body")
    b = WireUpstream("b", tokens=5)
    gw = await make_gateway({"aws": [a], "gcp": [b]}, timeouts=FAST, health={"probe_interval": 0})
    client = gw.client()

    async def ask(**extra: Any) -> str:
        if not stream:
            completion = await client.chat.completions.create(model="m", messages=MESSAGES, **extra)
            return completion.choices[0].message.content or ""
        chunks = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True, **extra)
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    pin(gw)
    assert await ask() == b.text(5)  # aws failed after its headers, gcp answered
    unpin(gw)
    await assert_released(gw.gateway.proxy)
    assert await ask() == a.text(5)  # plain success (aws is ejected: gcp... or aws, same text)
    await assert_released(gw.gateway.proxy)
    a.default = b.default = "hang"
    before = len(a.requests) + len(b.requests)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        await ask(extra_headers={"x-skyfabric-deadline": "0.6"})
    assert info.value.status_code in (502, 504)
    assert time.monotonic() - started < 1.2
    await assert_released(gw.gateway.proxy)
    hung = sorted(a.requests + b.requests, key=lambda s: s.at)[before:]
    assert hung, "the deadline request reached no upstream"
    for seen in hung:  # the gateway walked away from each hung attempt: each upstream saw it
        assert await a.wait_gone(seen, 1.0) is not None


async def test_clients_that_leave_the_admission_queue_release_their_places(make_gateway: MakeGateway) -> None:
    up = WireUpstream("up", tokens=2, token_delay=0.6)
    gw = await make_gateway({"aws": [up]}, timeouts=PATIENT, health={"probe_interval": 0})
    proxy = gw.gateway.proxy
    proxy.admission.capacity = lambda model: 1  # one slot: every other request queues
    holder = asyncio.ensure_future(gw.client().chat.completions.create(model="m", messages=MESSAGES))
    while not up.requests:
        await asyncio.sleep(0.01)
    leavers = [gw.client(timeout=0.3) for _ in range(5)]
    results = await asyncio.gather(
        *[c.chat.completions.create(model="m", messages=MESSAGES) for c in leavers], return_exceptions=True
    )
    assert all(isinstance(r, openai.APITimeoutError) for r in results), results
    completion = await holder
    assert completion.choices[0].message.content == up.text(2)
    await assert_released(proxy)
    assert len(up.requests) == 1  # the leavers never reached the upstream
    # the slot is free again: the next request is admitted at once
    again = await gw.client(timeout=5).chat.completions.create(model="m", messages=MESSAGES)
    assert again.choices[0].message.content == up.text(2)
    await assert_released(proxy)


async def test_slot_handed_to_a_waiter_that_is_cancelled_in_the_same_instant_is_given_back() -> None:
    admission = Admission(lambda model: 1, queue_timeout=5.0, queue_limit=8, clock=time.monotonic)
    deadline = time.monotonic() + 5
    await admission.acquire("m", 5, deadline)  # the only slot
    waiter = asyncio.ensure_future(admission.acquire("m", 5, deadline))
    await asyncio.sleep(0)
    assert admission.waiting("m") == 1
    admission.release("m", 0.1)  # hands the slot to the waiter; its task has not resumed yet …
    waiter.cancel()  # … when its client goes away
    with pytest.raises(asyncio.CancelledError):
        await waiter
    gate = admission.gates["m"]
    assert gate.inflight == 0 and not gate.queue
    await asyncio.wait_for(admission.acquire("m", 5, deadline), 0.5)  # and the slot can be taken again
