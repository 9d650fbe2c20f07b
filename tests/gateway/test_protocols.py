"""Both front doors to both wire protocols, end to end with the official SDKs.

The Anthropic stand-in (``tests/support/anthropic_standin.py``) speaks the Messages API byte for byte and
refuses what the real API refuses (unknown fields, trailing whitespace in a prefill, a prefill with
thinking on); the OpenAI fake upstream behaves like vLLM. Each test names the client protocol and the
backend it reaches; streams cut mid-text, mid-tool-call and mid-thinking must finish with exactly the
uninterrupted answer.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import MakeGateway, RunningGateway
from tests.support.anthropic_answer import verify_thinking
from tests.support.anthropic_standin import StandIn
from tests.support.counters import assert_released
from tests.support.fake_upstream import FakeUpstream
from tests.support.scripted_upstream import ScriptedUpstream
from tests.support.tools import OPENAI_TOOLS, TOOLS


async def standins(
    make_gateway: MakeGateway, n: int = 1, **options: Any
) -> tuple[RunningGateway, list[StandIn]]:
    """A gateway over ``n`` stand-ins, one provider each. They share one fault script: a fault queued on
    any is served by whichever answers next (the first attempt), so the continuation finds the other whole.
    """
    ups = [StandIn(f"standin-{i}", **options) for i in range(n)]
    for up in ups[1:]:
        up.script = ups[0].script
    providers = {f"p{i}": [up] for i, up in enumerate(ups)}
    gw = await make_gateway(providers, retry={"outage_wait": 0.5})
    return gw, ups


async def _stream_text(client: anthropic.AsyncAnthropic, **kwargs: Any) -> anthropic.types.Message:
    async with client.messages.stream(**kwargs) as stream:
        async for _ in stream:
            pass
        return await stream.get_final_message()


# -- Anthropic client → Anthropic backend (pass-through) ---------------------------------------------------


async def test_anthropic_client_to_anthropic_backend(make_gateway: MakeGateway) -> None:
    gw, (up,) = await standins(make_gateway)
    client = gw.claude()
    kwargs: dict[str, Any] = {
        "model": "m",
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    whole = await client.messages.create(**kwargs)
    streamed = await _stream_text(client, **kwargs)
    assert whole.content[0].text == streamed.content[0].text != ""
    assert whole.stop_reason == streamed.stop_reason == "end_turn"
    assert streamed.usage.output_tokens == whole.usage.output_tokens > 0
    assert up.requests[-1].body["model"] == up.model  # renamed to the upstream's model
    counted = await client.messages.count_tokens(model="m", messages=kwargs["messages"])
    assert counted.input_tokens > 0
    await assert_released(gw.gateway.proxy)


async def test_anthropic_tools_and_thinking_pass_through(make_gateway: MakeGateway) -> None:
    gw, _ = await standins(make_gateway)
    client = gw.claude()
    message = await _stream_text(
        client,
        model="m",
        max_tokens=3000,
        thinking={"type": "enabled", "budget_tokens": 1024},
        tools=TOOLS,
        messages=[{"role": "user", "content": "Call the tool for Paris"}],
    )
    kinds = [b.type for b in message.content]
    assert kinds[0] == "thinking" and kinds[-1] == "tool_use", kinds
    thinking = message.content[0]
    assert verify_thinking(thinking.thinking, thinking.signature)
    assert message.stop_reason == "tool_use"
    assert isinstance(message.content[-1].input, dict) and message.content[-1].input


# -- OpenAI client → Anthropic backend (translated) --------------------------------------------------------


async def test_openai_client_to_anthropic_backend(make_gateway: MakeGateway) -> None:
    gw, (up,) = await standins(make_gateway)
    client = gw.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    whole = await client.chat.completions.create(model="m", messages=messages, max_tokens=200)
    assert whole.choices[0].finish_reason == "stop"
    assert whole.choices[0].message.content
    assert whole.usage is not None and whole.usage.completion_tokens > 0
    sent = up.requests[-1].body
    assert sent["system"] and all(m["role"] != "system" for m in sent["messages"])
    stream = await client.chat.completions.create(
        model="m", messages=messages, max_tokens=200, stream=True, stream_options={"include_usage": True}
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == whole.choices[0].message.content
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    # tools: Anthropic's tool_use comes back as OpenAI tool_calls
    called = await client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "weather?"}],
        tools=OPENAI_TOOLS,
        tool_choice="required",
        max_tokens=200,
    )
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)
    # errors: Anthropic's 400 reaches an OpenAI client as OpenAI's shape
    up.set_fault({"status": 400}, times=1)
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="m", messages=messages, max_tokens=20)
    assert err.value.status_code == 400
    await assert_released(gw.gateway.proxy)


# -- Anthropic client → OpenAI backend (translated) --------------------------------------------------------


async def test_anthropic_client_to_openai_backend(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"p": [FakeUpstream("a")]})
    client = gw.claude()
    kwargs: dict[str, Any] = {
        "model": "m",
        "max_tokens": 64,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "Hi"}],
    }
    whole = await client.messages.create(**kwargs)
    streamed = await _stream_text(client, **kwargs)
    assert whole.content[0].text and whole.content[0].text == streamed.content[0].text
    assert whole.stop_reason in ("end_turn", "max_tokens")
    assert streamed.usage.output_tokens == whole.usage.output_tokens > 0
    assert streamed.usage.input_tokens == whole.usage.input_tokens > 0
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.create(**{**kwargs, "model": "nope"})
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.create(model="m", max_tokens=10, messages=[])  # type: ignore[arg-type]
    await assert_released(gw.gateway.proxy)


# -- continuation across a cut, both client protocols ------------------------------------------------------


@pytest.mark.parametrize("fault", [{"cut_after": 3}, {"cut_in": "text"}, {"error_in": "text"}])
async def test_anthropic_stream_cut_mid_text_completes_identically(
    make_gateway: MakeGateway, fault: dict[str, Any]
) -> None:
    gw, ups = await standins(make_gateway, 2, delta_delay=0.005)  # the client has text before the cut
    client = gw.claude()
    kwargs: dict[str, Any] = {
        "model": "m",
        "max_tokens": 300,
        # Anthropic's stream says how many tokens it sent only at its end: continuing exactly under a
        # token limit needs a replay, which needs a deterministic answer.
        "extra_body": {"temperature": 0},
        "messages": [{"role": "user", "content": "Write some code"}],
    }
    expected = await _stream_text(client, **kwargs)
    ups[0].set_fault(fault, times=1)
    got = await _stream_text(client, **kwargs)
    assert got.content[0].text == expected.content[0].text
    assert got.stop_reason == expected.stop_reason
    assert got.usage.output_tokens == expected.usage.output_tokens
    assert not ups[0].script  # the fault was served (a cut before the first token is a plain retry)
    await assert_released(gw.gateway.proxy)


@pytest.mark.parametrize("cut", ["tool_json", "thinking"])
async def test_anthropic_stream_cut_mid_tool_call_or_thinking_completes_identically(
    make_gateway: MakeGateway, cut: str
) -> None:
    gw, ups = await standins(make_gateway, 2, delta_delay=0.005)
    client = gw.claude()
    kwargs: dict[str, Any] = {
        "model": "m",
        "max_tokens": 3000,
        "extra_body": {"temperature": 0},
        "tools": TOOLS,
        "messages": [{"role": "user", "content": "Call the tool for Paris"}],
    }
    if cut == "thinking":
        kwargs["thinking"] = {"type": "enabled", "budget_tokens": 1024}
        kwargs.pop("extra_body")  # thinking takes no temperature; a replay is still checked exactly
    expected = await _stream_text(client, **kwargs)
    ups[0].set_fault({"cut_in": cut}, times=1)
    got = await _stream_text(client, **kwargs)
    assert [b.model_dump() for b in got.content] == [
        {**b.model_dump(), **({"id": got.content[i].id} if b.type == "tool_use" else {})}
        for i, b in enumerate(expected.content)
    ]
    assert got.stop_reason == expected.stop_reason
    await assert_released(gw.gateway.proxy)


async def test_openai_client_stream_cut_on_anthropic_backend_completes_identically(
    make_gateway: MakeGateway,
) -> None:
    gw, ups = await standins(make_gateway, 2)
    client = gw.client()
    kwargs: dict[str, Any] = {
        "model": "m",
        "max_tokens": 300,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Write some code"}],
        "stream": True,
    }

    async def text() -> str:
        out = ""
        async for chunk in await client.chat.completions.create(**kwargs):
            if chunk.choices:
                out += chunk.choices[0].delta.content or ""
        return out

    expected = await text()
    ups[0].set_fault({"cut_after": 4}, times=1)
    assert await text() == expected
    await assert_released(gw.gateway.proxy)


# -- the rest of the matrix: stop reasons, errors both ways, tool results, a coding agent's request --------


async def test_stop_reasons_map_both_ways(make_gateway: MakeGateway) -> None:
    gw, (up,) = await standins(make_gateway)
    client = gw.client()
    messages = [{"role": "user", "content": "Write some code"}]
    short = await client.chat.completions.create(model="m", messages=messages, max_tokens=3)
    assert short.choices[0].finish_reason == "length"  # Anthropic's max_tokens
    assert short.usage is not None and short.usage.completion_tokens == 3
    whole = await client.chat.completions.create(model="m", messages=messages, max_tokens=300)
    text = whole.choices[0].message.content or ""
    word = text.split()[len(text.split()) // 2]
    stopped = await client.chat.completions.create(model="m", messages=messages, max_tokens=300, stop=[word])
    assert stopped.choices[0].finish_reason == "stop"  # Anthropic's stop_sequence
    assert word not in (stopped.choices[0].message.content or "")
    assert up.requests[-1].body["stop_sequences"] == [word]
    # and the other way: an OpenAI backend's finish reasons reach an Anthropic client in its words
    gw2 = await make_gateway({"p": [FakeUpstream("a", tokens=10)]})
    claude2 = gw2.claude()
    capped = await claude2.messages.create(
        model="m", max_tokens=4, messages=[{"role": "user", "content": "x"}]
    )
    assert capped.stop_reason == "max_tokens" and capped.usage.output_tokens == 4
    done = await claude2.messages.create(
        model="m", max_tokens=50, messages=[{"role": "user", "content": "x"}]
    )
    assert done.stop_reason == "end_turn"


async def test_errors_map_both_ways(make_gateway: MakeGateway) -> None:
    gw, (up,) = await standins(make_gateway)
    client = gw.client()
    messages = [{"role": "user", "content": "x"}]
    up.set_fault({"status": 529}, times=5)  # overloaded everywhere: an OpenAI client gets 503
    with pytest.raises(openai.APIStatusError) as err:
        await client.chat.completions.create(model="m", messages=messages, max_tokens=5)
    assert err.value.status_code in (502, 503)
    up.set_fault(None)
    up.set_fault({"status": 429, "retry_after": 3}, times=5)
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(model="m", messages=messages, max_tokens=5)
    assert limited.value.response.headers.get("retry-after")
    up.set_fault(None)
    # an Anthropic client's bad request is refused in Anthropic's shape before any backend sees it
    before = len(up.requests)
    with pytest.raises(anthropic.BadRequestError) as bad:
        await gw.claude().messages.create(model="m", max_tokens=0 - 1, messages=messages)  # type: ignore[arg-type]
    assert bad.value.body["type"] == "error" and bad.value.body["error"]["type"] == "invalid_request_error"
    assert len(up.requests) == before
    # an OpenAI backend's context-length 400 reaches an Anthropic client as invalid_request_error
    gw2 = await make_gateway(
        {"p": [FakeUpstream("a", default={"status": 400, "code": "context_length_exceeded"})]}
    )
    with pytest.raises(anthropic.BadRequestError) as ctx_err:
        await gw2.claude().messages.create(model="m", max_tokens=5, messages=messages)
    assert ctx_err.value.body["error"]["type"] == "invalid_request_error"
    await assert_released(gw.gateway.proxy)


async def test_tool_results_round_trip_from_an_openai_client_to_anthropic(make_gateway: MakeGateway) -> None:
    gw, (up,) = await standins(make_gateway)
    client = gw.client()
    first = await client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "weather?"}],
        tools=OPENAI_TOOLS,
        tool_choice="required",
        max_tokens=200,
    )
    call = first.choices[0].message.tool_calls[0]
    second = await client.chat.completions.create(
        model="m",
        messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
        ],
        tools=OPENAI_TOOLS,
        max_tokens=200,
    )
    assert second.choices[0].finish_reason == "stop" and second.choices[0].message.content
    sent = up.requests[-1].body["messages"]
    assert sent[1]["content"][-1]["type"] == "tool_use" and sent[1]["content"][-1]["id"] == call.id
    result = sent[2]["content"][0]
    assert result["type"] == "tool_result" and result["tool_use_id"] == call.id
    assert result["content"] in ("sunny, 21 C", [{"type": "text", "text": "sunny, 21 C"}])


async def test_a_coding_agents_request_reaches_both_backend_kinds(make_gateway: MakeGateway) -> None:
    """``?beta=true``, a dozen betas, adaptive thinking, context_management, system turns mid-conversation,
    25 tools, thinking kept across turns, ~85 KB: never refused; passed through to Anthropic, translated to
    an OpenAI-compatible engine."""
    from tests.protocols.anthropic_samples import BETAS, coding_agent_request
    from tests.support.anthropic_answer import sign_thinking

    body = {**coding_agent_request(), "model": "m", "stream": False}
    for message in body["messages"]:  # signed by this stand-in, as the real API checks its own signatures
        for block in message["content"] if isinstance(message["content"], list) else []:
            if block.get("type") == "thinking":
                block["signature"] = sign_thinking(block["thinking"])
    headers = {"anthropic-beta": ",".join(BETAS), "anthropic-version": "2023-06-01", "x-api-key": "k"}
    gw, (up,) = await standins(make_gateway)
    async with httpx.AsyncClient(timeout=10) as http:
        resp = await http.post(f"{gw.root}/v1/messages?beta=true", json=body, headers=headers)
        assert resp.status_code == 200, resp.text
        assert resp.json()["type"] == "message"
        seen = up.requests[-1]
        assert seen.headers.get("anthropic-beta") == ",".join(BETAS)
        assert seen.body["context_management"] == body["context_management"]
        assert len(seen.body["tools"]) == 25
        gw2 = await make_gateway({"p": [FakeUpstream("a")]})  # an 8k-context engine: ask for less output
        small = {**body, "max_tokens": 1024}
        resp = await http.post(f"{gw2.root}/v1/messages?beta=true", json=small, headers=headers)
        assert resp.status_code == 200, resp.text
        assert resp.json()["content"][-1]["type"] == "text"


async def test_what_a_backend_cannot_do_is_refused_not_dropped(make_gateway: MakeGateway) -> None:
    gw, (up,) = await standins(make_gateway)
    client = gw.client()
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match="n > 1 is not supported"):
        await client.chat.completions.create(model="m", messages=messages, max_tokens=5, n=2)
    with pytest.raises(openai.BadRequestError, match="logprobs is not supported"):
        await client.chat.completions.create(model="m", messages=messages, max_tokens=5, logprobs=True)
    assert not [r for r in up.requests if r.inference]
    await assert_released(gw.gateway.proxy)


async def test_the_continuation_selftest_speaks_anthropic(make_gateway: MakeGateway) -> None:
    """The self-test asks through the adapter: a question, then a prefill of half its answer (trailing
    whitespace stripped, as the API demands); the stand-in continues it, so the claim stands."""
    up = StandIn("selftested")
    gw = await make_gateway({"p": [up]}, health={"selftest": True})
    await asyncio.wait_for(gw.gateway.selftests.wait(), 5.0)
    asked = [r.body for r in up.requests if r.inference]
    assert len(asked) == 2 and asked[1]["messages"][-1]["role"] == "assistant"
    prefill = asked[1]["messages"][-1]["content"]
    text = prefill if isinstance(prefill, str) else prefill[0]["text"]
    assert text and not text.endswith((" ", "\n"))
    assert gw.gateway.proxy.states["p/r1/pool/0"].continues is True


async def test_models_in_both_shapes(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"p": [FakeUpstream("a")]})
    anthropic_models = [m.id async for m in gw.claude().models.list()]
    openai_models = [m.id for m in (await gw.client().models.list()).data]
    assert set(anthropic_models) == set(openai_models) == {"m", "alias-m"}


# -- framing a fake would not produce on its own (regressions found in review) ------------------------------


def _chunk(delta: dict[str, Any], *, finish: str | None = None, completion: int = 1) -> bytes:
    obj = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        "usage": {"prompt_tokens": 5, "completion_tokens": completion, "total_tokens": 5 + completion},
    }
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def test_a_re_encoded_pass_through_chunk_keeps_its_tool_calls_id_and_name(
    make_gateway: MakeGateway,
) -> None:
    """max_tokens without include_usage: the gateway asks vLLM for usage in every chunk and strips it, so
    every chunk is re-encoded; the one opening a tool call must still carry its id and name."""
    call = {
        "index": 0,
        "id": "call_abc",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    up = ScriptedUpstream(
        [
            _chunk({"role": "assistant", "content": ""}, completion=0),
            _chunk({"tool_calls": [call]}),
            _chunk(
                {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]}, completion=5
            ),
            _chunk({}, finish="tool_calls", completion=5),
            b"data: [DONE]\n\n",
        ]
    )
    gw = await make_gateway({"p": [up]})
    stream = await gw.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], tools=OPENAI_TOOLS, max_tokens=50, stream=True
    )
    calls = [
        c.choices[0].delta.tool_calls[0]
        for c in [c async for c in stream]
        if c.choices and c.choices[0].delta.tool_calls
    ]
    assert calls[0].id == "call_abc" and calls[0].function.name == "get_weather"
    assert "".join(c.function.arguments or "" for c in calls) == '{"city": "Paris"}'
    assert up.requests[0]["stream_options"]["continuous_usage_stats"] is True
    await assert_released(gw.gateway.proxy)


async def test_a_reset_after_the_finish_ends_the_stream_rather_than_continuing_it(
    make_gateway: MakeGateway,
) -> None:
    first = ScriptedUpstream(
        [_chunk({"role": "assistant", "content": "Hello"}), _chunk({}, finish="stop")], reset=True
    )
    second = FakeUpstream("second", tokens=10)
    gw = await make_gateway({"aws": [first], "gcp": [second]})
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding = 1000  # the stream starts on the scripted one
    stream = await gw.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], stream=True
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == "Hello" and finishes == ["stop"]
    assert second.requests == []
    gw.gateway.proxy.states["gcp/r1/pool/0"].outstanding -= 1000
    await assert_released(gw.gateway.proxy)


async def test_an_anthropic_stream_ending_after_message_delta_keeps_its_stop_reason(
    make_gateway: MakeGateway,
) -> None:
    """The backend closed cleanly after message_delta (no message_stop): the client gets message_stop only,
    not a second message_start or a message_delta saying end_turn."""

    def sse(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

    usage = {"input_tokens": 5, "output_tokens": 1}
    up = ScriptedUpstream(
        [
            sse(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": "msg_1",
                        "type": "message",
                        "role": "assistant",
                        "model": "claude",
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": usage,
                    },
                },
            ),
            sse(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": {},
                    },
                },
            ),
            sse(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": '{"city": "Paris"}'},
                },
            ),
            sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
            sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                    "usage": {"output_tokens": 9},
                },
            ),
        ],
        engine="anthropic",
    )
    gw = await make_gateway({"p": [up]})
    async with httpx.AsyncClient(timeout=10) as http:
        resp = await http.post(
            f"{gw.root}/v1/messages",
            json={
                "model": "m",
                "max_tokens": 50,
                "stream": True,
                "messages": [{"role": "user", "content": "x"}],
            },
            headers={"anthropic-version": "2023-06-01"},
        )
    events = [line[7:] for line in resp.text.splitlines() if line.startswith("event: ")]
    assert events.count("message_start") == 1 and events.count("message_delta") == 1
    assert events[-1] == "message_stop" and events.count("content_block_stop") == 1
    final = await _stream_text(
        gw.claude(), model="m", max_tokens=50, messages=[{"role": "user", "content": "x"}]
    )
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 9
    await assert_released(gw.gateway.proxy)


async def test_an_image_for_a_text_only_engine_is_refused_not_dropped(make_gateway: MakeGateway) -> None:
    """skyfabric's own replica reads text only: an Anthropic client's image is a clear 400, never lost."""
    up = FakeUpstream("text-only")
    up.engine = "local"  # type: ignore[attr-defined]
    gw = await make_gateway({"p": [up]})
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError, match="an image is not supported"):
        await gw.claude().messages.create(
            model="m",
            max_tokens=10,
            messages=[{"role": "user", "content": [image, {"type": "text", "text": "what is it?"}]}],
        )
    assert up.requests == []
    reply = await gw.claude().messages.create(
        model="m", max_tokens=10, messages=[{"role": "user", "content": "x"}]
    )
    assert reply.content[0].text
    await assert_released(gw.gateway.proxy)
