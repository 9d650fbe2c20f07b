"""An endpoint ejected is sent nothing more: not by a hedge, not by a pick that went stale before its send.

A pick and its send are apart whenever the attempt runs as a task of its own (a hedged race) or sleeps
out a backoff first; an ejection learnt in between must stop the call, and the request picks again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from skyfabric.gateway.balancer import Cluster, EndpointState, eject
from tests.conftest import MakeGateway, RunningGateway
from tests.support.fake_upstream import FakeUpstream, expected_text

FAST = {"connect": 0.5, "first_byte": 2, "first_token": 2, "idle": 2, "response": 2, "total": 10}


def model_calls(up: FakeUpstream) -> int:
    """Chat requests the upstream received (health probes go to ``/completions``)."""
    return sum(1 for body in up.requests if "messages" in body)


def eject_on_pick(
    gw: RunningGateway, nth: int, stale: Callable[[EndpointState], object] | None = None
) -> list[EndpointState]:
    """Make the ``nth`` pick of model ``m`` go stale: its endpoint is ejected (or ``stale`` is done to it)
    right after the pick, before anything else the event loop runs (as when another request's failure is
    processed first)."""
    proxy = gw.gateway.proxy
    picks: list[EndpointState] = []
    if stale is None:
        stale = lambda s: eject(s, proxy.clock(), proxy.outlier)  # noqa: E731

    class Stale(Cluster):
        def pick(self, now: float, **kwargs: Any) -> EndpointState | None:
            state = super().pick(now, **kwargs)
            if state is not None:
                picks.append(state)
                if len(picks) == nth:
                    asyncio.get_running_loop().call_soon(stale, state)
            return state

    real = proxy.clusters["m"]
    proxy.clusters["m"] = Stale(real.model, real.states, real.slow_start)  # the same endpoint states
    return picks


async def ask(gw: RunningGateway, *, stream: bool) -> str:
    messages = [{"role": "user", "content": "x"}]
    if not stream:
        answer = await gw.client().chat.completions.create(model="m", messages=messages)
        return answer.choices[0].message.content or ""
    chunks = await gw.client().chat.completions.create(model="m", messages=messages, stream=True)
    return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])


async def test_a_hedge_is_never_sent_to_an_ejected_endpoint(make_gateway: MakeGateway) -> None:
    # The only endpoint a hedge could go to is ejected: the balancer's panic pick offers it anyway, and a
    # hedge (an extra, optional attempt) must not take it.
    slow = FakeUpstream("slow", tokens=4, default={"slow_first_token": 0.4})
    out = FakeUpstream("out", tokens=4)
    models = [{"name": "m", "hedge": {"after": 0.05}}]
    gw = await make_gateway({"aws": [slow], "gcp": [out]}, models=models, timeouts=FAST)
    proxy = gw.gateway.proxy
    eject(proxy.states["gcp/r1/pool/0"], proxy.clock(), proxy.outlier)
    assert await ask(gw, stream=True) == expected_text(4)
    assert model_calls(out) == 0
    assert model_calls(slow) == 1
    assert proxy.metrics.hedges._value.get() == 0
    assert all(s.outstanding == 0 for s in proxy.states.values())


async def test_a_hedge_is_never_sent_to_a_provider_cooling_down(make_gateway: MakeGateway) -> None:
    slow = FakeUpstream("slow", tokens=4, default={"slow_first_token": 0.4})
    cooling = FakeUpstream("cooling", tokens=4)
    models = [{"name": "m", "hedge": {"after": 0.05}}]
    gw = await make_gateway({"aws": [slow], "gcp": [cooling]}, models=models, timeouts=FAST)
    proxy = gw.gateway.proxy
    proxy.cooldowns["gcp"] = proxy.clock() + 60  # as after its 429 with Retry-After: 60
    assert await ask(gw, stream=True) == expected_text(4)
    assert model_calls(cooling) == 0
    assert proxy.metrics.hedges._value.get() == 0


async def test_an_endpoint_ejected_after_its_pick_in_a_hedged_race_is_sent_nothing(
    make_gateway: MakeGateway,
) -> None:
    # A hedged model's stream attempts run as tasks: the loop may run other work (an ejection) between
    # the pick and the task's first step. (Whole answers are not hedged: their pick and send are one step.)
    a, b = FakeUpstream("a", tokens=3), FakeUpstream("b", tokens=3)
    models = [{"name": "m", "hedge": {"after": 1.0}}]
    gw = await make_gateway({"aws": [a], "gcp": [b]}, models=models, timeouts=FAST)
    picks = eject_on_pick(gw, 1)
    assert await ask(gw, stream=True) == expected_text(3)
    stale, used = picks[0], picks[1]
    assert stale is not used
    ups = {"aws/r1/pool/0": a, "gcp/r1/pool/0": b}
    assert model_calls(ups[stale.endpoint.id]) == 0  # ejected before the send: never called
    assert model_calls(ups[used.endpoint.id]) == 1
    proxy = gw.gateway.proxy
    assert all(s.outstanding == 0 and not s.inflight for s in proxy.states.values())
    assert proxy.metrics.hedges._value.get() == 0


@pytest.mark.parametrize("how", ["ejected", "drained"])
async def test_an_endpoint_out_of_rotation_after_the_backoff_before_a_retry_is_sent_nothing(
    make_gateway: MakeGateway, how: str
) -> None:
    # The retry's endpoint is picked, then the backoff is slept (same provider as the failure), then the
    # call is sent: an ejection learnt during the sleep, or discovery draining the endpoint (it left the
    # fleet), sends the retry elsewhere.
    dead, first, second = (
        FakeUpstream("dead"),
        FakeUpstream("first", tokens=2),
        FakeUpstream("second", tokens=2),
    )
    gw = await make_gateway({"aws": [dead, first, second]}, retry={"backoff_base": 0.05, "backoff_max": 0.05})
    await dead.stop()  # refuses connections
    proxy = gw.gateway.proxy
    ids = [s.endpoint.id for s in proxy.clusters["m"].states]
    # least-loaded order: dead, then first, then second
    proxy.states[ids[1]].outstanding += 500
    proxy.states[ids[2]].outstanding += 1000
    drain = (lambda state: proxy.drain_endpoint(state.endpoint.id)) if how == "drained" else None
    picks = eject_on_pick(gw, 2, drain)
    try:
        assert await ask(gw, stream=False) == expected_text(2)
    finally:
        proxy.states[ids[1]].outstanding -= 500
        proxy.states[ids[2]].outstanding -= 1000
    assert [p.endpoint.id for p in picks] == ids
    assert proxy.states[ids[1]].draining == (how == "drained")
    assert model_calls(first) == 0  # picked, out of rotation by the end of the backoff: never called
    assert model_calls(second) == 1
    assert proxy.metrics.retries._value.get() == 1  # one retry sent, after one backoff: not two
    assert all(s.outstanding == 0 and not s.inflight for s in proxy.states.values())
