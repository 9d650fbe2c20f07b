"""Mid-stream failover: a stream that breaks after k tokens goes on from another backend, seamlessly."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest

from tests.conftest import MakeGateway, RunningGateway
from tests.support.fake_upstream import FakeUpstream, expected_text

FAST = {"connect": 0.5, "first_byte": 0.5, "first_token": 0.5, "idle": 0.4, "response": 1.0, "total": 10}


async def read_stream(gw: RunningGateway, kind: str = "chat", **kwargs: Any) -> list[Any]:
    client = gw.client()
    if kind == "chat":
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "code"}], stream=True, **kwargs
        )
    else:
        stream = await client.completions.create(model="m", prompt="def f():", stream=True, **kwargs)
    return [chunk async for chunk in stream]


def chat_text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def pinned(
    make_gateway: MakeGateway, first: FakeUpstream, second: FakeUpstream, **extra: Any
) -> RunningGateway:
    """A gateway where ``first`` (aws) takes the first attempt and ``second`` (gcp) the rescue."""
    gw = await make_gateway({"aws": [first], "gcp": [second]}, timeouts=FAST, **extra)
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding = 1000
    return gw


def unpin(gw: RunningGateway) -> None:
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding -= 1000


@pytest.mark.parametrize(
    "fault",
    [{"cut_after": 4}, {"stall_after": 4}, {"malformed_after": 4}, {"no_finish_after": 4}],
    ids=["cut", "stall", "malformed-event", "ends-without-finish"],
)
async def test_broken_stream_is_continued_with_exact_text(make_gateway: MakeGateway, fault: Any) -> None:
    first, second = FakeUpstream("first", tokens=10).then(fault), FakeUpstream("second", tokens=10)
    first.token_delay = 0.01  # tokens arrive one by one, so the first ones are committed before the fault
    gw = await pinned(make_gateway, first, second)
    chunks = await read_stream(gw, stream_options={"include_usage": True})
    unpin(gw)
    assert chat_text(chunks) == expected_text(10)  # no gap, no repeat
    assert {c.id for c in chunks} == {chunks[0].id}  # one stream id throughout
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
    assert roles == ["assistant"]  # the continuation's opening chunk is not repeated
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 10  # both parts counted
    # the continuation asked the second backend to go on from the exact prefix (trailing space left out:
    # chat templates trim it; the engine's own next token brings it back, and the relay drops it)
    cont = second.requests[-1]
    assert cont["continue_final_message"] is True and cont["add_generation_prompt"] is False
    assert cont["messages"][-1] == {"role": "assistant", "content": expected_text(4).rstrip()}
    assert gw.gateway.proxy.metrics.rescued._value.get() == 1


async def test_completions_stream_is_continued_from_the_prompt(make_gateway: MakeGateway) -> None:
    first, second = FakeUpstream("first", tokens=8).then({"cut_after": 3}), FakeUpstream("second", tokens=8)
    gw = await pinned(make_gateway, first, second)
    chunks = await read_stream(gw, kind="completions")
    assert "".join(c.choices[0].text for c in chunks) == expected_text(8)
    assert second.requests[-1]["prompt"] == "def f():" + expected_text(3).rstrip()


async def test_max_tokens_is_reduced_by_what_was_already_sent(make_gateway: MakeGateway) -> None:
    first, second = FakeUpstream("first", tokens=20).then({"cut_after": 5}), FakeUpstream("second", tokens=20)
    gw = await pinned(make_gateway, first, second)
    chunks = await read_stream(gw, max_tokens=8, extra_body={"min_tokens": 8})
    assert chat_text(chunks) == expected_text(8)
    assert second.requests[-1]["max_tokens"] == 3 and second.requests[-1]["min_tokens"] == 3


async def test_stream_finished_but_without_done_is_completed_not_failed(make_gateway: MakeGateway) -> None:
    first, second = FakeUpstream("first", tokens=6).then("no_done"), FakeUpstream("second", tokens=6)
    gw = await pinned(make_gateway, first, second)
    chunks = await read_stream(gw)
    assert chat_text(chunks) == expected_text(6)
    assert second.requests == []  # nothing to rescue: the answer was complete


async def test_backend_that_cannot_continue_is_never_sent_a_prefill(make_gateway: MakeGateway) -> None:
    first = FakeUpstream("first", tokens=10, default={"cut_after": 4})  # the only capable one keeps dying
    no_prefill = FakeUpstream("no-prefill", tokens=10, can_continue=False)
    gw = await pinned(make_gateway, first, no_prefill, retry={"outage_wait": 0.2})
    with pytest.raises(openai.APIError) as info:
        await read_stream(gw)
    assert "no backend could continue" in str(info.value)  # an in-band error, not a silent truncation
    assert no_prefill.requests == []


async def test_stream_error_is_in_band_and_never_looks_finished(make_gateway: MakeGateway) -> None:
    import httpx

    first = FakeUpstream("first", tokens=10, default={"cut_after": 4})  # every answer dies at 4 tokens
    gw = await make_gateway({"aws": [first]}, timeouts=FAST, retry={"outage_wait": 0.2})
    async with (
        httpx.AsyncClient() as http,
        http.stream(
            "POST",
            f"{gw.base_url}/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True},
        ) as resp,
    ):
        events = [line async for line in resp.aiter_lines() if line.startswith("data: ")]
    assert resp.status_code == 200
    assert events[-1] != "data: [DONE]"
    last = orjson.loads(events[-1][6:])
    assert last["error"]["code"] == "stream_interrupted"
    finishes = [orjson.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
    assert not any(finishes)


async def test_second_break_is_continued_again(make_gateway: MakeGateway) -> None:
    a = FakeUpstream("a", tokens=12).then({"cut_after": 3})
    b = FakeUpstream("b", tokens=12).then({"stall_after": 3})  # breaks 3 tokens into its continuation
    c = FakeUpstream("c", tokens=12)
    gw = await make_gateway({"aws": [a], "gcp": [b], "azure": [c]}, timeouts=FAST)
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding = 1000
    gw.gateway.proxy.states["azure/r1/pool/0"].outstanding = 2000
    chunks = await read_stream(gw)
    assert chat_text(chunks) == expected_text(12)
    assert c.requests[-1]["messages"][-1]["content"] == expected_text(6).rstrip()


async def test_in_band_upstream_error_event_is_rescued(make_gateway: MakeGateway) -> None:
    first, second = FakeUpstream("first", tokens=6), FakeUpstream("second", tokens=6)
    gw = await pinned(make_gateway, first, second)

    original = first._stream

    async def error_after_two(request, body, kind, b, start, count, prompt_tokens):  # type: ignore[no-untyped-def]
        from aiohttp import web

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(2):
            chunk = {
                "id": "x",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "m",
                "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
            }
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await resp.write(b'data: {"error": {"message": "engine crashed", "type": "server_error"}}\n\n')
        await resp.write_eof()
        first._stream = original  # type: ignore[method-assign]
        return resp

    first._stream = error_after_two  # type: ignore[method-assign]
    chunks = await read_stream(gw)
    assert chat_text(chunks) == expected_text(6)
