"""The Anthropic stand-in speaks the Messages API like the real one: checked with the SDK and raw HTTP.

Without the gateway: a gateway test that fails against this stand-in fails because of the gateway.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import message_count_tokens_params, message_create_params

from tests.support.anthropic_answer import count_tokens, tokens, verify_thinking
from tests.support.anthropic_rules import COUNT_FIELDS, MESSAGE_FIELDS
from tests.support.anthropic_standin import StandIn, parse_fault, start_standin

USER: list[Any] = [{"role": "user", "content": "write code"}]
TOOLS = [
    {
        "name": "edit_file",
        "description": "Edit a file",
        "input_schema": {
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "line": {"type": "integer"},
                "options": {
                    "type": "object",
                    "properties": {
                        "dry_run": {"type": "boolean"},
                        "tags": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
            "required": ["path"],
        },
    },
    {"name": "noop", "input_schema": {"type": "object", "properties": {}}},
]
THINK = {"type": "enabled", "budget_tokens": 2048}


@pytest.fixture
async def standin() -> AsyncIterator[StandIn]:
    async with StandIn(name="a") as s:
        yield s
        await s.wait_idle(connections=False)


def client(s: StandIn, **kw: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=s.url.removesuffix("/v1"), api_key=s.api_key, max_retries=0, **kw
    )


def headers(s: StandIn, **extra: str) -> dict[str, str]:
    return {"x-api-key": s.api_key, "anthropic-version": "2023-06-01", **extra}


def body(s: StandIn, **kw: Any) -> dict[str, Any]:
    return {"model": s.model, "max_tokens": 1024, "messages": USER, **kw}


def events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in raw.split("\n\n"):
        if frame.strip():
            head, data = frame.split("\n", 1)
            assert head.startswith("event: ") and data.startswith("data: "), frame
            out.append((head[7:], json.loads(data[6:])))
    return out


async def raw_stream(s: StandIn, payload: dict[str, Any], **extra: str) -> tuple[httpx.Response, str]:
    """A streamed request read to its end, or to where the connection broke (the text got so far)."""
    got = b""
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(5, read=0.5)) as http,
        http.stream(
            "POST", s.url + "/messages", json={**payload, "stream": True}, headers=headers(s, **extra)
        ) as resp,
    ):
        try:
            async for piece in resp.aiter_raw():
                got += piece
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ReadTimeout):
            pass
    return resp, got.decode()


def deltas(evs: list[tuple[str, dict[str, Any]]], kind: str) -> list[str]:
    key = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}[kind]
    return [d["delta"][key] for e, d in evs if e == "content_block_delta" and d["delta"]["type"] == kind]


# -- the SDK against the stand-in ----------------------------------------------------------------------------


async def test_sync_async_and_streaming_sdk_get_the_same_answer(standin: StandIn) -> None:
    sync = anthropic.Anthropic(
        base_url=standin.url.removesuffix("/v1"), api_key=standin.api_key, max_retries=0
    )
    whole: Any = await asyncio.to_thread(lambda: sync.messages.create(**body(standin)))
    assert whole.stop_reason == "end_turn" and whole.content[0].type == "text"
    text = whole.content[0].text
    assert "\n" in text and text == text.strip()
    assert whole.usage.output_tokens == count_tokens(text) and whole.usage.input_tokens > 0
    again = await client(standin).messages.create(**body(standin))
    assert again.content[0].text == text and again.id != whole.id  # same conversation, same answer
    async with client(standin).messages.stream(**body(standin)) as stream:
        streamed = [t async for t in stream.text_stream]
        final: Any = await stream.get_final_message()
    assert "".join(streamed) == text and final.content[0].text == text
    assert final.usage.output_tokens == whole.usage.output_tokens
    other = await client(standin).messages.create(**body(standin, system="be terse"))
    assert other.content[0].text != text  # the system prompt is part of what the model sees
    seen = standin.messages[0]
    assert (
        seen.headers["authorization"] == f"Bearer {standin.api_key}" and "anthropic-version" in seen.headers
    )
    assert seen.body == body(standin) and seen.completed


async def test_wire_habits_of_the_real_api(standin: StandIn) -> None:
    resp, raw = await raw_stream(standin, body(standin))
    assert resp.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["request-id"].startswith("req_011C") and resp.headers["anthropic-organization-id"]
    assert '"type":"message_start","message":{"model"' in raw  # compact JSON
    evs = events(raw)
    names = [e for e, _ in evs]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = evs[0][1]["message"]
    assert start["usage"]["output_tokens"] == 1 and start["content"] == [] and start["stop_reason"] is None
    assert {"cache_read_input_tokens", "cache_creation_input_tokens"} <= set(start["usage"])
    pieces = deltas(evs, "text_delta")
    sizes = [count_tokens(p) for p in pieces]
    assert max(sizes) >= 4 and len(set(sizes)) >= 3  # several tokens per delta, uneven
    end = evs[-2][1]
    assert end["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert end["usage"]["output_tokens"] == count_tokens("".join(pieces))


async def test_tool_use_streams_json_in_uneven_pieces_and_reassembles(standin: StandIn) -> None:
    ask = [{"role": "user", "content": "please call the edit tool"}]
    whole = await client(standin).messages.create(**body(standin, tools=TOOLS, messages=ask))
    assert whole.stop_reason == "tool_use"
    kinds = [b.type for b in whole.content]
    assert kinds == ["text", "tool_use"]  # tool_choice auto: a few words first
    call = whole.content[1]
    assert call.type == "tool_use" and call.id.startswith("toolu_01")
    async with client(standin).messages.stream(**body(standin, tools=TOOLS, messages=ask)) as stream:
        final = await stream.get_final_message()
    streamed = final.content[-1]
    assert streamed.type == "tool_use" and streamed.input == call.input and streamed.name == call.name
    dumped = json.dumps(call.input, ensure_ascii=False)
    assert '\\"' in dumped and "🙂" in dumped
    _, raw = await raw_stream(standin, body(standin, tools=TOOLS, messages=ask))
    parts = deltas(events(raw), "input_json_delta")
    assert parts[0] == "" and len(parts) >= 4 and any(p.endswith("\\") for p in parts)
    assert json.loads("".join(parts)) == call.input
    forced = await client(standin).messages.create(
        **body(standin, tools=TOOLS, tool_choice={"type": "tool", "name": "noop"})
    )
    assert [b.type for b in forced.content] == ["tool_use"] and forced.content[0].input == {}
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "ok"}]}
    after = [
        *ask,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in whole.content]},
        result,
    ]
    answer = await client(standin).messages.create(**body(standin, tools=TOOLS, messages=after))
    assert answer.stop_reason == "end_turn" and [b.type for b in answer.content] == ["text"]
    stray = [
        *ask,
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [result["content"][0]]},
    ]
    with pytest.raises(anthropic.BadRequestError, match="unexpected `tool_use_id`"):
        await client(standin).messages.create(**body(standin, tools=TOOLS, messages=stray))


async def test_thinking_is_signed_streamed_and_checked_when_sent_back(standin: StandIn) -> None:
    req = body(standin, max_tokens=4096, thinking=THINK)
    async with client(standin).messages.stream(**req) as stream:
        final = await stream.get_final_message()
    think, text = final.content
    assert think.type == "thinking" and text.type == "text"
    assert verify_thinking(think.thinking, think.signature)
    again = await client(standin).messages.create(**req)
    assert again.content[0].type == "thinking" and again.content[0].thinking == think.thinking
    _, raw = await raw_stream(standin, req)
    evs = events(raw)
    assert evs[1][1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    in_block0 = [d["delta"]["type"] for e, d in evs if e == "content_block_delta" and d["index"] == 0]
    assert in_block0[-1] == "signature_delta" and set(in_block0[:-1]) == {"thinking_delta"}
    adaptive = await client(standin).messages.create(**body(standin, thinking={"type": "adaptive"}))
    assert adaptive.content[0].type == "thinking"
    turn = {"role": "assistant", "content": [think.model_dump(), text.model_dump(exclude_none=True)]}
    convo = [*USER, turn, {"role": "user", "content": "go on"}]
    ok = await client(standin).messages.create(**{**req, "messages": convo})
    assert ok.content[0].type == "thinking"
    forged = json.loads(json.dumps(convo))
    forged[1]["content"][0]["thinking"] += " (edited)"
    with pytest.raises(anthropic.BadRequestError, match="Invalid `signature` in `thinking` block"):
        await client(standin).messages.create(**{**req, "messages": forged})
    redacted = await client(standin).messages.create(
        **{**req, "messages": [{"role": "user", "content": "ANTHROPIC_MAGIC_STRING_TRIGGER_REDACTED_THINKING_"
                                "46C9A13E193C177646C7398A98432ECCCE4C1253"}]}
    )  # fmt: skip
    assert redacted.content[0].type == "redacted_thinking"


async def test_count_tokens_models_and_prompt_cache(standin: StandIn) -> None:
    c = client(standin)
    counted = await c.messages.count_tokens(model=standin.model, messages=USER, system="be terse")
    made = await c.messages.create(**body(standin, system="be terse"))
    assert counted.input_tokens == made.usage.input_tokens > 0
    models = await c.models.list()
    assert [m.id for m in models.data] == list(standin.models) and models.data[0].type == "model"
    system = [{"type": "text", "text": "long rules " * 50, "cache_control": {"type": "ephemeral"}}]
    first = await c.messages.create(**body(standin, system=system))
    second = await c.messages.create(**body(standin, system=system))
    assert first.usage.cache_creation_input_tokens == second.usage.cache_read_input_tokens > 100
    assert first.usage.cache_read_input_tokens == 0 and second.usage.cache_creation_input_tokens == 0
    assert first.content == second.content  # cache markers do not change the answer


# -- continuing a prefill ------------------------------------------------------------------------------------


async def test_a_prefill_is_continued_with_exactly_the_rest_of_the_answer(standin: StandIn) -> None:
    full = (await client(standin).messages.create(**body(standin))).content[0].text
    positions = range(1, len(full), 3)
    async with httpx.AsyncClient(timeout=5) as http:
        for cut in positions:
            prefill = full[:cut].rstrip()  # the API refuses trailing whitespace: the gateway trims it
            if not prefill:
                continue
            msgs = [*USER, {"role": "assistant", "content": prefill}]
            resp = await http.post(
                standin.url + "/messages", json=body(standin, messages=msgs), headers=headers(standin)
            )
            rest = "".join(b["text"] for b in resp.json()["content"])
            assert prefill + rest == full, (cut, prefill[-10:], rest[:10])
    mid = full[: len(full) // 2].rstrip()
    _, raw = await raw_stream(standin, body(standin, messages=[*USER, {"role": "assistant", "content": mid}]))
    assert mid + "".join(deltas(events(raw), "text_delta")) == full
    other = StandIn(name="b")  # another backend continues exactly the same way
    async with other:
        moved = await client(other).messages.create(
            **body(other, messages=[*USER, {"role": "assistant", "content": mid}])
        )
    assert mid + moved.content[0].text == full
    stranger = await client(standin).messages.create(
        **body(standin, messages=[*USER, {"role": "assistant", "content": "Zz"}])
    )
    assert stranger.content[0].text[:1].isspace() and len(stranger.content[0].text) > 5  # continued anyway


async def test_max_tokens_and_stop_sequences(standin: StandIn) -> None:
    full = (await client(standin).messages.create(**body(standin))).content[0].text
    short = await client(standin).messages.create(**body(standin, max_tokens=5))
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 5
    assert short.content[0].text == "".join(tokens(full)[:5])
    word = tokens(full)[20]
    stopped = await client(standin).messages.create(**body(standin, stop_sequences=["@@", word]))
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == word
    assert stopped.content[0].text == full[: full.index(word)]


# -- refusals, as the real API refuses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "status", "needle"),
    [
        ({"n": 2}, 400, "n: Extra inputs are not permitted"),
        ({"frequency_penalty": 0.5}, 400, "frequency_penalty: Extra inputs are not permitted"),
        ({"context_management": {"edits": []}}, 400, "context_management: Extra inputs are not permitted"),
        ({"max_tokens": None}, 400, "max_tokens: Input should be a valid integer"),
        ({"model": "claude-nope"}, 404, "model: claude-nope"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, 'first message must use the "user"'),
        ({"messages": [{"role": "tool", "content": "hi"}]}, 400, "messages.0.role: Input should be"),
        (
            {"messages": [*USER, {"role": "assistant", "content": "def f():\n    "}]},
            400,
            "messages: final assistant content cannot end with trailing whitespace",
        ),
        (
            {"max_tokens": 4096, "thinking": THINK, "messages": [*USER, {"role": "assistant", "content": "I"}]},  # noqa: E501
            400,
            "Expected `thinking` or `redacted_thinking`, but found `text`",
        ),
        ({"thinking": {"type": "enabled", "budget_tokens": 100}}, 400, "greater than or equal to 1024"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "name": "u"}]}]}, 400,
         "messages.0.content.0.text.name: Extra inputs are not permitted"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools.0: Input tag 'function'"),
    ],
)  # fmt: skip
async def test_requests_the_real_api_refuses(
    standin: StandIn, change: dict[str, Any], status: int, needle: str
) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        resp = await http.post(
            standin.url + "/messages", json=body(standin, **change), headers=headers(standin)
        )
    assert resp.status_code == status, resp.text
    data = resp.json()
    assert data["type"] == "error" and needle in data["error"]["message"]
    assert data["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert data["request_id"] == resp.headers["request-id"]


async def test_beta_fields_need_a_beta_header_and_auth_comes_first(standin: StandIn) -> None:
    beta = body(standin, context_management={"edits": []})
    async with httpx.AsyncClient(timeout=5) as http:
        ok = await http.post(
            standin.url + "/messages?beta=true",
            json=beta,
            headers=headers(standin, **{"anthropic-beta": "context-management-2025-06-27"}),
        )
        assert ok.status_code == 200
        nokey = await http.post(
            standin.url + "/messages", json=body(standin), headers={"anthropic-version": "2023-06-01"}
        )
        assert (nokey.status_code, nokey.json()["error"]) == (
            401, {"type": "authentication_error", "message": "x-api-key header is required"}
        )  # fmt: skip
        noversion = await http.post(
            standin.url + "/messages", json=body(standin), headers={"x-api-key": standin.api_key}
        )
        assert (
            noversion.status_code == 400
            and noversion.json()["error"]["message"] == "anthropic-version: header is required"
        )
        counted = await http.post(
            standin.url + "/messages/count_tokens", json=body(standin), headers=headers(standin)
        )
        assert counted.json()["error"]["message"] == "max_tokens: Extra inputs are not permitted"
    midway = [*USER, {"role": "assistant", "content": "ok"}, {"role": "system", "content": "be brief"}, *USER]
    plain = [*USER, {"role": "assistant", "content": "ok"}, *USER]
    with_system = await client(standin).messages.create(**body(standin, messages=midway))
    assert (
        with_system.content
        != (await client(standin).messages.create(**body(standin, messages=plain))).content
    )
    with pytest.raises(anthropic.AuthenticationError):
        await anthropic.AsyncAnthropic(
            base_url=standin.url[:-3], api_key="wrong", max_retries=0
        ).messages.create(**body(standin))


async def test_a_prompt_over_the_context_window_and_a_body_over_32_mb() -> None:
    async with StandIn(context_window=50) as s, client(s) as c:
        with pytest.raises(anthropic.BadRequestError, match=r"prompt is too long: \d+ tokens > 50 maximum"):
            await c.messages.create(**body(s, messages=[{"role": "user", "content": "word " * 60}]))
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(
            b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 40000000\r\n\r\n{"
        )
        answer = await asyncio.wait_for(reader.read(), 5)  # refused before the body is read, then closed
        writer.close()
        assert answer.startswith(b"HTTP/1.1 413 ") and b'"type":"request_too_large"' in answer
        await c.close()
        await s.wait_idle()


def test_the_accepted_fields_cover_the_sdks_params() -> None:
    headers_only = {"user_profile_id", "workspace_id"}
    assert set(message_create_params.MessageCreateParamsBase.__annotations__) - headers_only <= MESSAGE_FIELDS
    assert (
        set(message_count_tokens_params.MessageCountTokensParams.__annotations__) - headers_only
        <= COUNT_FIELDS
    )


# -- errors and faults ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "error", "kind"),
    [
        ("status=429;retry_after=3", anthropic.RateLimitError, "rate_limit_error"),
        ("status=500", anthropic.InternalServerError, "api_error"),
        ("status=529", anthropic.OverloadedError, "overloaded_error"),
        ("status=403", anthropic.PermissionDeniedError, "permission_error"),
        ("status=413", anthropic.APIStatusError, "request_too_large"),
    ],
)
async def test_error_statuses_map_to_the_sdks_exceptions(
    standin: StandIn, fault: str, error: type[anthropic.APIStatusError], kind: str
) -> None:
    with pytest.raises(error) as caught:
        await client(standin).messages.create(**body(standin), extra_headers={"x-standin-fault": fault})
    assert caught.value.body["error"]["type"] == kind  # type: ignore[index]
    if kind == "rate_limit_error":
        assert caught.value.response.headers["retry-after"] == "3"
    if kind == "overloaded_error":
        assert caught.value.status_code == 529 and isinstance(caught.value, anthropic.InternalServerError)


async def test_the_next_k_requests_fail_then_it_recovers(standin: StandIn) -> None:
    standin.set_fault({"status": 529}, times=2)
    for _ in range(2):
        with pytest.raises(anthropic.OverloadedError):
            await client(standin).messages.create(**body(standin))
    assert (await client(standin).messages.create(**body(standin))).stop_reason == "end_turn"
    standin.then("close", "reset")
    for _ in range(2):
        with pytest.raises(anthropic.APIConnectionError):
            await client(standin).messages.create(**body(standin))
    assert [m.status for m in standin.messages] == [529, 529, 200, 0, 0]


async def test_a_stream_cut_after_k_deltas_has_no_message_stop(standin: StandIn) -> None:
    full = (await client(standin).messages.create(**body(standin))).content[0].text
    _, raw = await raw_stream(standin, body(standin), **{"x-standin-fault": "cut_after=3"})
    evs = events(raw)
    got = deltas(evs, "text_delta")
    assert len(got) == 3 and full.startswith("".join(got)) and "message_stop" not in [e for e, _ in evs]
    assert standin.messages[-1].deltas_sent == 3 and not standin.messages[-1].completed
    with pytest.raises(Exception) as caught:  # the SDK lets its HTTP library's read error through mid-stream
        async with client(standin).messages.stream(
            **body(standin), extra_headers={"x-standin-fault": "cut_after=2"}
        ) as s:
            await s.get_final_message()
    assert type(caught.value).__name__ in ("ReadError", "RemoteProtocolError")


async def test_cuts_inside_a_tool_call_and_inside_thinking(standin: StandIn) -> None:
    ask = body(standin, tools=TOOLS, messages=[{"role": "user", "content": "call a tool"}])
    whole: Any = await client(standin).messages.create(**ask)
    full_json = json.dumps(whole.content[-1].input, ensure_ascii=False)
    _, raw = await raw_stream(standin, ask, **{"x-standin-fault": "cut_in=tool_json"})
    partial = "".join(deltas(events(raw), "input_json_delta"))
    assert partial and full_json.startswith(partial) and len(partial) < len(full_json)
    think = body(standin, max_tokens=4096, thinking=THINK)
    _, raw = await raw_stream(standin, think, **{"x-standin-fault": "cut_in=thinking"})
    evs = events(raw)
    thought = "".join(deltas(evs, "thinking_delta"))
    complete = (await client(standin).messages.create(**think)).content[0]
    assert thought and complete.type == "thinking" and complete.thinking.startswith(thought)
    assert thought != complete.thinking and "signature_delta" not in raw
    resp, raw = await raw_stream(standin, body(standin), **{"x-standin-fault": "cut_in=tool_json"})
    assert resp.status_code == 500 and "no tool_json block to fault in" in raw  # a test asking the impossible


async def test_in_band_error_and_hangs(standin: StandIn) -> None:
    _, raw = await raw_stream(standin, body(standin), **{"x-standin-fault": "error_after=2"})
    evs = events(raw)
    assert (
        evs[-1]
        == (
            "error",
            {
                "type": "error",
                "error": {"type": "overloaded_error", "message": "Overloaded"},
                "request_id": standin.messages[-1].request_id,
            },
        )
        and len(deltas(evs, "text_delta")) == 2
    )
    with pytest.raises(anthropic.APIStatusError, match="overloaded_error"):
        async with client(standin).messages.stream(
            **body(standin), extra_headers={"x-standin-fault": "error_after=1"}
        ) as s:
            await s.get_final_message()
    resp, raw = await raw_stream(standin, body(standin), **{"x-standin-fault": "hang_after=2"})
    assert (
        resp.status_code == 200 and len(deltas(events(raw), "text_delta")) == 2
    )  # then silence: read timeout
    async with httpx.AsyncClient(timeout=httpx.Timeout(5, read=0.3)) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(
                standin.url + "/messages",
                json=body(standin),
                headers=headers(standin, **{"x-standin-fault": "hang"}),
            )
    await standin.wait_idle(connections=False)  # the client left: nothing is held for it
    assert [m.client_gone for m in standin.messages[-2:]] == [True, False]


async def test_a_non_streaming_cut_sends_half_the_body(standin: StandIn) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):  # half the body, then RST
            await http.post(
                standin.url + "/messages",
                json=body(standin),
                headers=headers(standin, **{"x-standin-fault": "cut_after=1"}),
            )
    assert standin.messages[-1].status == 200 and not standin.messages[-1].completed
    await standin.wait_idle()
    assert standin.open_connections == 0


def test_fault_headers_parse() -> None:
    assert parse_fault("hang") == "hang"
    assert parse_fault("status=429;retry_after=2") == {"status": 429, "retry_after": 2}
    assert parse_fault("cut_in=tool_json") == {"cut_in": "tool_json"}
    assert parse_fault('{"delay": 0.5}') == {"delay": 0.5}


async def test_started_with_the_helper_and_connections_counted() -> None:
    s = await start_standin(name="c", models={"m-1": 1000})
    try:
        async with httpx.AsyncClient() as http:
            resp = await http.get(s.url + "/models/m-1", headers=headers(s))
            assert resp.json()["id"] == "m-1" and s.open_connections == 1
        await s.wait_idle()
    finally:
        await s.stop()
