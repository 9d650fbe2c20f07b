"""Where a request may go: what it can reach, where a context overflow goes, and a request at fault.

Regression tests for issue 10 items 1, 2 and 9 (gateway side): real HTTP, the official SDK, fake upstreams.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from skyfabric.gateway.admission import Admission, worker_share
from skyfabric.gateway.fit import MAX_CHARS_PER_TOKEN, prompt_token_floor
from tests.conftest import MakeGateway, RunningGateway
from tests.support.fake_upstream import FakeUpstream, expected_text

FAST = {"connect": 0.5, "first_byte": 1.0, "first_token": 1.0, "idle": 1.0, "response": 1.0, "total": 10}
HI = [{"role": "user", "content": "hi"}]


def serving(name: str, model: str, **kwargs: Any) -> FakeUpstream:
    """A fake upstream whose pool serves fleet model ``model``."""
    up = FakeUpstream(name, **kwargs)
    up.model = model  # type: ignore[attr-defined]  # read by tests.conftest.fleet_data
    return up


def assert_quiet(gw: RunningGateway) -> None:
    """Every in-flight counter is back to zero."""
    proxy = gw.gateway.proxy
    for state in proxy.states.values():
        assert (state.outstanding, state.streaming, len(state.inflight)) == (0, 0, 0), state.endpoint.id
    assert proxy.admission.in_use() == 0 and proxy.admission.waiting() == 0
    assert proxy.budget.active_requests == 0 and proxy.budget.active_retries == 0


async def timed_chat(
    client: Any, model: str, *, stream: bool = False, **kwargs: Any
) -> tuple[float, str, str]:
    """(seconds, text, backend) of one chat request through the SDK."""
    started = time.monotonic()
    if stream:
        async with client.chat.completions.with_streaming_response.create(
            model=model, messages=HI, stream=True, **kwargs
        ) as resp:
            text = "".join([c.choices[0].delta.content or "" async for c in await resp.parse() if c.choices])
            backend = resp.headers["x-skyfabric-backend"]
    else:
        raw = await client.chat.completions.with_raw_response.create(model=model, messages=HI, **kwargs)
        text, backend = raw.parse().choices[0].message.content or "", raw.headers["x-skyfabric-backend"]
    return time.monotonic() - started, text, backend


# -- 1. admission counts what a request can reach ---------------------------------------------------------


async def test_a_model_whose_only_pool_is_ejected_is_served_by_its_fallback_not_queued(
    make_gateway: MakeGateway,
) -> None:
    dead, spare = serving("dead", "m"), serving("spare", "f", tokens=3)
    gw = await make_gateway(
        {"aws": [dead], "gcp": [spare]},
        models=[{"name": "m", "fallbacks": ["f"]}, {"name": "f"}],
        admission={"queue_timeout": 2.0, "queue_limit": 64},
        timeouts=FAST,
    )
    await dead.stop()  # connection refused from now on
    client = gw.client()
    await timed_chat(client, "m")  # the refusal ejects m's only endpoint
    proxy = gw.gateway.proxy
    assert not proxy.states["aws/r1/pool/0"].available(proxy.clock())
    results = await asyncio.gather(*[timed_chat(client, "m", stream=i % 2 == 1) for i in range(40)])
    assert {text for _, text, _ in results} == {expected_text(3)}
    assert {backend for _, _, backend in results} == {"gcp/r1/pool/0"}
    worst = max(seconds for seconds, _, _ in results)
    assert worst < 1.5, worst  # not queued for the dead model's capacity (the old code: 2 s, then 429)
    assert len(spare.requests) == 41
    assert_quiet(gw)


async def test_a_busy_healthy_model_still_queues_rather_than_spilling_to_its_fallback() -> None:
    capacity = {"m": 1, "f": 5}
    gate = Admission(lambda model: capacity[model], queue_timeout=5, queue_limit=8, clock=time.monotonic)
    assert await gate.acquire(("m", "f"), 5, time.monotonic() + 10) == "m"
    waiting = asyncio.ensure_future(gate.acquire(("m", "f"), 5, time.monotonic() + 10))
    await asyncio.sleep(0.01)
    assert not waiting.done() and gate.waiting() == 1  # m is busy, not down: wait for it
    capacity["m"] = 0  # m's pool is ejected: the waiter goes to what it can reach
    gate.dispatch_all()
    assert await asyncio.wait_for(waiting, 1) == "f"
    gate.release("m", 0.1)
    gate.release("f", 0.1)
    assert gate.in_use() == 0 and gate.waiting() == 0


async def test_a_waiter_handed_a_slot_as_its_client_leaves_gives_it_back() -> None:
    gate = Admission(lambda model: 1, queue_timeout=5, queue_limit=8, clock=time.monotonic)
    await gate.acquire("m", 5, time.monotonic() + 10)
    waiting = asyncio.ensure_future(gate.acquire("m", 5, time.monotonic() + 10))
    await asyncio.sleep(0.01)
    gate.release("m", 0.1)  # hands the slot to the waiter...
    waiting.cancel()  # ...whose client disconnects in the same turn
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert gate.gates["m"].inflight == 0  # the old code kept the slot for good


def test_workers_divide_capacity_and_never_starve() -> None:
    assert [worker_share(32, w, 3) for w in range(3)] == [11, 11, 10]
    assert sum(worker_share(7, w, 4) for w in range(4)) == 7
    assert [worker_share(2, w, 4) for w in range(4)] == [1, 1, 1, 1]  # at least one each
    assert worker_share(0, 1, 4) == 0  # nothing up: nothing to admit
    gate = Admission(lambda model: 8, queue_timeout=1, queue_limit=0, clock=time.monotonic)
    gate.set_share(1, 2)
    assert gate.capacity("m") == 4


class CountingUpstream(FakeUpstream):
    """A fake that records the most requests it ever had in flight at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.now = 0
        self.peak = 0

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            return await super()._serve(request, kind)
        finally:
            self.now -= 1


async def test_serve_workers_together_admit_the_fleets_capacity_not_n_times_it(tmp_path: Any) -> None:
    from tests.gateway.test_serve import free_port

    up = await CountingUpstream("u", tokens=2, default={"delay": 1.0}).start()
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "models: [{name: m}]\n"
        "providers: [{name: p, regions: [{name: r, pools: [{name: x, accelerator: cpu, engine: vllm,"
        f" model: m, endpoints: ['{up.url}'], capacity: {{concurrency: 4}}}}]}}]}}]\n"
        "health: {probe_interval: 0, selftest: false}\n"  # its probes are not client requests
        "admission: {queue_timeout: 0, queue_limit: 0}\n"
    )
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "skyfabric.cli", "serve", "--config", str(fleet), "--port", str(port),
        "--workers", "2", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            for _ in range(200):
                try:
                    if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    await asyncio.sleep(0.1)
            body = {"model": "m", "messages": HI}
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            results = await asyncio.gather(*[http.post(url, json=body) for _ in range(24)])
        statuses = [r.status_code for r in results]
        assert set(statuses) <= {200, 429}
        assert up.peak <= 4, up.peak  # two workers each admitting the whole capacity: up to 8
        assert statuses.count(200) >= 2 and 429 in statuses
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
        await up.stop()


# -- 2. a context-length error goes to larger_context first, never to a smaller context ----------------


async def test_context_overflow_goes_to_larger_context_before_a_smaller_fallback(
    make_gateway: MakeGateway,
) -> None:
    small = serving("small", "m", default="context_length")
    smaller_fallback = serving("fb", "f", default="context_length")
    large = serving("large", "big", tokens=4)
    gw = await make_gateway(
        {"aws": [small], "gcp": [smaller_fallback], "azure": [large]},
        models=[
            {"name": "m", "context_length": 256, "fallbacks": ["f"], "larger_context": "big"},
            {"name": "f", "context_length": 128},
            {"name": "big", "context_length": 4096},
        ],
        timeouts=FAST,
    )
    for stream in (False, True):
        seconds, text, backend = await timed_chat(gw.client(), "m", stream=stream)
        assert (text, backend) == (expected_text(4), "azure/r1/pool/0")
        assert seconds < 1.0
    assert len(smaller_fallback.requests) == 0  # 128 tokens cannot hold what overflowed 256
    assert len(small.requests) == 2
    assert_quiet(gw)


async def test_context_overflow_skips_fallbacks_of_smaller_known_context(make_gateway: MakeGateway) -> None:
    small = serving("small", "m", default="context_length")
    tiny = serving("tiny", "t", default="context_length")
    wide = serving("wide", "w", tokens=3)
    gw = await make_gateway(
        {"aws": [small], "gcp": [tiny], "azure": [wide]},
        models=[
            {"name": "m", "context_length": 256, "fallbacks": ["t", "w"]},
            {"name": "t", "context_length": 256},
            {"name": "w", "context_length": 8192},
        ],
        timeouts=FAST,
    )
    _, text, backend = await timed_chat(gw.client(), "m")
    assert (text, backend) == (expected_text(3), "azure/r1/pool/0")
    assert len(tiny.requests) == 0
    assert_quiet(gw)


async def test_context_overflow_with_nowhere_larger_is_the_backends_400(make_gateway: MakeGateway) -> None:
    small = serving("small", "m", default="context_length")
    gw = await make_gateway({"aws": [small]}, models=[{"name": "m", "context_length": 256}], timeouts=FAST)
    with pytest.raises(openai.BadRequestError) as info:
        await gw.client().chat.completions.create(model="m", messages=HI)
    assert info.value.code == "context_length_exceeded"
    assert_quiet(gw)


# -- 9b. what cannot fit is refused before any upstream works on it ------------------------------------


def big_prompt(tokens: int) -> str:
    """A prompt that no tokenizer can make shorter than ``tokens`` tokens."""
    return "x" * (tokens * MAX_CHARS_PER_TOKEN + 1)


async def test_a_prompt_that_cannot_fit_is_refused_with_openais_400_before_any_upstream(
    make_gateway: MakeGateway,
) -> None:
    up = serving("a", "m")
    gw = await make_gateway({"aws": [up]}, models=[{"name": "m", "context_length": 256}], timeouts=FAST)
    client = gw.client()
    for kind in ("chat", "completions"):
        started = time.monotonic()
        with pytest.raises(openai.BadRequestError) as info:
            if kind == "chat":
                await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": big_prompt(256)}]
                )
            else:
                await client.completions.create(model="m", prompt=big_prompt(256))
        assert time.monotonic() - started < 1.0
        assert info.value.status_code == 400 and info.value.code == "context_length_exceeded"
        assert "maximum context length is 256 tokens" in info.value.message
        assert info.value.param == ("messages" if kind == "chat" else "prompt")
    assert up.requests == []
    assert_quiet(gw)


async def test_a_prompt_too_long_for_the_model_goes_straight_to_its_larger_context(
    make_gateway: MakeGateway,
) -> None:
    small, large = serving("small", "m"), serving("large", "big", tokens=2)
    gw = await make_gateway(
        {"aws": [small], "gcp": [large]},
        models=[
            {"name": "m", "context_length": 256, "larger_context": "big"},
            {"name": "big", "context_length": 1 << 20},
        ],
        timeouts=FAST,
    )
    raw = await gw.client().chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": big_prompt(300)}]
    )
    assert raw.headers["x-skyfabric-backend"] == "gcp/r1/pool/0"
    assert small.requests == [] and len(large.requests) == 1
    assert_quiet(gw)


async def test_the_size_bound_never_refuses_what_could_fit(make_gateway: MakeGateway) -> None:
    up = serving("a", "m", tokens=2)
    gw = await make_gateway({"aws": [up]}, models=[{"name": "m", "context_length": 256}], timeouts=FAST)
    image = "data:image/png;base64," + "A" * (2 * 256 * MAX_CHARS_PER_TOKEN)
    fits = [
        [{"role": "user", "content": "x" * (256 * MAX_CHARS_PER_TOKEN)}],  # at the bound, not over it
        [{"role": "user", "content": "hi" + " " * (2 * 256 * MAX_CHARS_PER_TOKEN)}],  # whitespace collapses
        [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                      {"type": "image_url", "image_url": {"url": image}}]}],
        [{"role": "assistant", "content": "<think>" + "y" * (2 * 256 * MAX_CHARS_PER_TOKEN) + "</think>ok"},
         {"role": "user", "content": "go on"}],  # earlier reasoning that templates drop
    ]  # fmt: skip
    for messages in fits:
        completion = await gw.client().chat.completions.create(model="m", messages=messages)
        assert completion.choices[0].message.content == expected_text(2)
    assert len(up.requests) == len(fits)
    assert prompt_token_floor("completions", {"prompt": list(range(300))}) == 300
    assert prompt_token_floor("completions", {"prompt": ["a", big_prompt(9)]}) == 10
    assert_quiet(gw)


# -- 9a. a request that fails the same way on two providers is the request's fault ---------------------


class PoisonedUpstream(FakeUpstream):
    """Answers every request normally, except one whose prompt says ``poison``: that one gets ``fault``."""

    def __init__(self, *args: Any, fault: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fault = fault
        self.poisoned = 0

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        if "poison" in json.dumps(await request.json()):
            self.poisoned += 1
            self.script.appendleft(self.fault)
        return await super()._serve(request, kind)


@pytest.mark.parametrize(("fault", "status"), [("hang", 504), ({"status": 500}, 500)])
async def test_a_request_failing_alike_on_two_busy_providers_stops_there_and_ejects_none(
    make_gateway: MakeGateway, fault: Any, status: int
) -> None:
    ups = [PoisonedUpstream(name, tokens=2, fault=fault) for name in ("a", "b", "c")]
    for up in ups:
        up.token_delay = 0.01
    gw = await make_gateway({"aws": ups[:1], "gcp": ups[1:2], "azure": ups[2:]}, timeouts=FAST)
    client = gw.client()
    stop = asyncio.Event()
    latencies: list[float] = []

    async def others() -> None:
        while not stop.is_set():
            seconds, text, _ = await timed_chat(client, "m")
            assert text == expected_text(2)
            latencies.append(seconds)

    background = [asyncio.ensure_future(others()) for _ in range(9)]
    await asyncio.sleep(0.2)
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=10) as http:
        resp = await http.post(
            f"{gw.base_url}/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "poison"}]},
        )
    elapsed = time.monotonic() - started
    stop.set()
    await asyncio.gather(*background)
    assert resp.status_code == status and "error" in resp.json()
    assert sorted(up.poisoned for up in ups) == [0, 1, 1]  # two providers, not all three
    assert elapsed < 2 * FAST["response"] + 0.8, elapsed
    proxy = gw.gateway.proxy
    now = proxy.clock()
    assert all(s.available(now) and s.ejections == 0 for s in proxy.states.values())
    # The first provider's failure is held back only if that endpoint finished other requests while this
    # one waited: a fast 500 on a loaded machine may beat them, and then it is counted (once, no ejection).
    assert sum(s.failures for s in proxy.states.values()) <= 1
    assert latencies and max(latencies) < 1.0, max(latencies)
    assert_quiet(gw)


async def test_on_a_quiet_fleet_the_second_alike_failure_stops_the_request(make_gateway: MakeGateway) -> None:
    ups = [PoisonedUpstream(name, tokens=2, fault="hang") for name in ("a", "b", "c")]
    gw = await make_gateway({"aws": ups[:1], "gcp": ups[1:2], "azure": ups[2:]}, timeouts=FAST)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        await gw.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "poison"}])
    assert info.value.status_code == 504
    assert time.monotonic() - started < 2 * FAST["response"] + 0.8
    assert sorted(up.poisoned for up in ups) == [0, 1, 1]
    # nothing showed the first endpoint was alive, so its timeout counted; the second is not blamed
    assert sum(s.ejections for s in gw.gateway.proxy.states.values()) <= 1
    assert_quiet(gw)


def test_a_larger_context_that_is_not_larger_is_a_config_error() -> None:
    from skyfabric.core.errors import ConfigError
    from skyfabric.core.fleet import parse_fleet
    from tests.conftest import fleet_data

    up = FakeUpstream("a")
    up.port = 9
    models = [
        {"name": "m", "context_length": 8192, "larger_context": "big"},
        {"name": "big", "context_length": 4096},
    ]
    with pytest.raises(ConfigError, match="not larger than its own"):
        parse_fleet(fleet_data({"aws": [up]}, models=models), "fleet.yaml")


def test_the_size_bound_judges_a_huge_prompt_by_its_first_megabytes() -> None:
    from skyfabric.core.textsize import nonspace_chars

    text = "héllo wörld " * 2_500_000  # 30 MB, 10 of every 12 characters not whitespace
    assert nonspace_chars(text) == 25_000_000
    capped = nonspace_chars(text, enough=3_000_000)
    assert 3_000_000 < capped < 25_000_000  # stopped early, and still a true lower bound
    body = {"messages": [{"role": "user", "content": text}]}
    floor = prompt_token_floor("chat", body, enough=4096)
    assert 4096 < floor <= prompt_token_floor("chat", body) == -(-25_000_000 // MAX_CHARS_PER_TOKEN)
