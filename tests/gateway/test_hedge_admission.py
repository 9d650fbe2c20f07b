"""Hedging a late first token, and admission control when capacity is short."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx
import pytest

from skyfabric.core.errors import NotSent, Overloaded, UpstreamError
from skyfabric.gateway.admission import Admission, _ModelGate, parse_priority
from skyfabric.gateway.hedge import TtftWindow, race
from tests.conftest import MakeGateway
from tests.support.fake_upstream import FakeUpstream, expected_text

FAST = {"connect": 0.5, "first_byte": 2, "first_token": 2, "idle": 2, "response": 2, "total": 10}


async def test_late_first_token_is_hedged_to_another_provider_and_the_loser_cancelled(
    make_gateway: MakeGateway,
) -> None:
    slow = FakeUpstream("slow", tokens=4, default={"slow_first_token": 1.5})
    fast = FakeUpstream("fast", tokens=4)
    models = [{"name": "m", "hedge": {"after": 0.1}}]
    gw = await make_gateway({"aws": [slow], "gcp": [fast]}, models=models, timeouts=FAST)
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding = 1000  # the first attempt goes to the slow one
    client = gw.client()  # made before the clock starts: the first one imports the SDK (~1 s on a slow host)
    started = time.monotonic()
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    elapsed = time.monotonic() - started
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding -= 1000
    assert text == expected_text(4)
    assert elapsed < 1.0  # answered by the hedge, not after the slow first token
    assert gw.gateway.proxy.metrics.hedges._value.get() == 1
    assert gw.gateway.proxy.states["aws/r1/pool/0"].outstanding == 0  # loser cancelled, not left running


async def test_race_returns_first_success_and_cancels_the_rest() -> None:
    cancelled = []

    async def slow() -> str:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append("slow")
            raise
        return "slow"

    async def quick() -> str:
        return "quick"

    async def broken() -> str:
        await asyncio.sleep(0.05)
        raise UpstreamError("boom", endpoint="x")

    async def late() -> str:
        await asyncio.sleep(0.1)
        return "late"

    assert await race(slow, lambda n: quick, 0.01, 1) == "quick"
    assert cancelled == ["slow"]
    errors: list[UpstreamError] = []
    # the first attempt fails while the hedge still runs: the hedge's answer is taken, the failure reported
    assert await race(broken, lambda n: late, 0.01, 1, on_error=errors.append) == "late"
    assert [str(e) for e in errors] == ["boom"]
    with pytest.raises(UpstreamError):
        await race(broken, lambda n: None, 0.01, 1)


@pytest.mark.parametrize("stale_first", [True, False], ids=["stale-first", "stale-hedge"])
async def test_race_raises_a_real_failure_over_a_stale_pick_and_reports_the_other(stale_first: bool) -> None:
    # Both attempts end in the same instant with nothing else running: the real failure is raised (the
    # caller counts it against its endpoint); the stale pick, which sent nothing, goes to on_error.
    go = asyncio.Event()

    async def broken() -> str:
        await go.wait()
        raise UpstreamError("boom", endpoint="a")

    async def stale() -> str:
        await go.wait()
        raise NotSent("stale", endpoint="b")

    def hedge(n: int) -> Callable[[], Awaitable[str]]:
        asyncio.get_running_loop().call_soon(go.set)  # both end together
        return broken if stale_first else stale

    errors: list[UpstreamError] = []
    with pytest.raises(UpstreamError) as raised:
        await race(stale if stale_first else broken, hedge, 0.01, 1, on_error=errors.append)
    assert str(raised.value) == "boom"
    assert [str(e) for e in errors] == ["stale"]


async def test_race_reports_every_failure_of_an_instant_but_the_one_it_raises() -> None:
    go = asyncio.Event()

    async def broken(name: str) -> str:
        await go.wait()
        raise UpstreamError(name, endpoint=name)

    def hedge(n: int) -> Callable[[], Awaitable[str]]:
        asyncio.get_running_loop().call_soon(go.set)
        return lambda: broken("b")

    errors: list[UpstreamError] = []
    with pytest.raises(UpstreamError) as raised:
        await race(lambda: broken("a"), hedge, 0.01, 1, on_error=errors.append)
    assert sorted([str(raised.value), *(str(e) for e in errors)]) == ["a", "b"]  # none dropped


def test_p95_window() -> None:
    window = TtftWindow()
    for i in range(19):
        window.add(i / 100)
    assert window.p95() is None
    for i in range(19, 100):
        window.add(i / 100)
    assert window.p95() == 0.94


async def test_admission_queues_then_sheds_lowest_priority_with_honest_retry_after() -> None:
    capacity = {"m": 2}
    clock = time.monotonic
    gate = Admission(lambda model: capacity[model], queue_timeout=5, queue_limit=2, clock=clock)
    await gate.acquire("m", 5, clock() + 10)
    await gate.acquire("m", 5, clock() + 10)  # full now
    low = asyncio.ensure_future(gate.acquire("m", 1, clock() + 10))
    normal = asyncio.ensure_future(gate.acquire("m", 5, clock() + 10))
    await asyncio.sleep(0.01)
    assert gate.waiting("m") == 2
    high = asyncio.ensure_future(gate.acquire("m", 9, clock() + 10))  # queue full: the low one is shed
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded) as info:
        await low
    assert info.value.status == 429 and info.value.retry_after >= 1
    with pytest.raises(Overloaded):
        await gate.acquire("m", 1, clock() + 10)  # full, and it is not more important than anyone
    gate.release("m", 2.0)
    await asyncio.sleep(0.01)
    assert high.done() and not normal.done()  # the most important waiter gets the slot first
    gate.release("m", 2.0)
    await asyncio.wait_for(normal, 1)


async def test_admission_wait_is_bounded_by_the_deadline() -> None:
    gate = Admission(lambda model: 1, queue_timeout=5, queue_limit=10, clock=time.monotonic)
    await gate.acquire("m", 5, time.monotonic() + 10)
    started = time.monotonic()
    with pytest.raises(Overloaded):
        await gate.acquire("m", 5, time.monotonic() + 0.2)
    assert time.monotonic() - started < 0.5


def test_priority_header() -> None:
    assert parse_priority(None) == 5 and parse_priority(b"high") == 9 and parse_priority(b"3") == 3
    from skyfabric.core.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        parse_priority(b"urgent!!")


async def test_over_capacity_gets_429_with_retry_after_over_http(make_gateway: MakeGateway) -> None:
    slow = FakeUpstream("slow", tokens=2, default={"delay": 0.5})
    gw = await make_gateway(
        {"aws": [slow]},
        admission={"queue_timeout": 0.1, "queue_limit": 0},
        # Admission, not timeouts, is under test: 32 calls opened at once on a loaded 2-core machine may
        # take longer than FAST's 0.5 s to connect (the whole suite saw 32 502s there once).
        timeouts={**FAST, "connect": 5, "first_byte": 5, "response": 5},
    )
    # capacity is pool concurrency (32 by default): 33 at once means one is shed
    async with httpx.AsyncClient(timeout=5) as http:
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        results = await asyncio.gather(
            *[http.post(f"{gw.base_url}/chat/completions", json=body) for _ in range(34)]
        )
    statuses = sorted(r.status_code for r in results)
    assert statuses.count(200) == 32 and statuses.count(429) == 2
    shed = next(r for r in results if r.status_code == 429)
    assert int(shed.headers["retry-after"]) >= 1
    assert shed.json()["error"]["code"] == "overloaded"
    assert all(
        r.json()["choices"][0]["message"]["content"] == expected_text(2)
        for r in results
        if r.status_code == 200
    )


async def test_waiters_are_admitted_when_capacity_comes_back_without_any_release() -> None:
    """Every endpoint ejected at once: nothing in flight, capacity 0; then a probe brings one back."""
    capacity = {"m": 0}
    gate = Admission(lambda model: capacity[model], queue_timeout=5, queue_limit=10, clock=time.monotonic)
    gate.gates["m"] = _ModelGate(inflight=1)
    waiting = asyncio.ensure_future(gate.acquire("m", 5, time.monotonic() + 10))
    await asyncio.sleep(0.01)
    gate.release("m", 1.0)  # the last request ends while capacity is still 0: nobody can be admitted
    assert not waiting.done() and gate.gates["m"].inflight == 0
    capacity["m"] = 4  # a probe readmits an endpoint
    gate.dispatch_all()  # the health loop's tick
    await asyncio.wait_for(waiting, 1)
    # and a new request is not stuck behind an empty queue
    await asyncio.wait_for(gate.acquire("m", 5, time.monotonic() + 10), 1)
    assert gate.gates["m"].inflight == 2


async def test_race_releases_an_answer_that_arrived_with_the_winner() -> None:
    released: list[str] = []
    gate = asyncio.Event()

    async def first() -> str:
        await gate.wait()
        return "first"

    async def second() -> str:
        gate.set()  # both commit in the same turn of the loop
        await asyncio.sleep(0)
        return "second"

    winner = await race(first, lambda n: second, 0.01, 1, discard=released.append)
    assert {winner, *released} == {"first", "second"} and len(released) == 1


async def test_race_cancelled_by_its_client_still_releases_an_attempt_that_answers_late() -> None:
    """The client goes away while the race cleans up a loser that ignores its cancel for a moment and then
    answers: the client's cancellation propagates, and the late answer is still released (its counters
    would otherwise stay in flight forever)."""
    released: list[str] = []
    cleaning = asyncio.Event()

    async def stubborn() -> str:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cleaning.set()
            await asyncio.sleep(0.05)  # an upstream that takes a moment to close, and had an answer
        return "stubborn"

    async def quick() -> str:
        await asyncio.sleep(0.02)
        return "quick"

    outer = asyncio.ensure_future(race(stubborn, lambda n: quick, 0.01, 1, discard=released.append))
    await asyncio.wait_for(cleaning.wait(), 1)  # the hedge won; the race is now waiting for the loser
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    await asyncio.sleep(0.1)
    assert released == ["stubborn"]
