"""The Anthropic Messages frontend: parsing as Anthropic validates; streams and bodies the SDK reads."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import anthropic
import httpx2
import pydantic
import pytest
from anthropic.types import Message as SDKMessage
from anthropic.types import RawMessageStreamEvent

from skyfabric.core.errors import InvalidRequest, MalformedEvent
from skyfabric.protocols.canonical import (
    CanonicalRequest,
    End,
    Event,
    Finish,
    Logprobs,
    Message,
    ReasoningDelta,
    ReasoningSignature,
    RedactedReasoning,
    Start,
    StreamError,
    TextDelta,
    Thinking,
    ToolCallDelta,
    ToolChoice,
    Usage,
)
from skyfabric.protocols.frontends.anthropic import AnthropicFrontend
from skyfabric.protocols.registry import FRONTENDS, resolve
from tests.protocols.anthropic_samples import BETAS, body_bytes, coding_agent_request

FRONTEND = AnthropicFrontend()
HEADERS = [(b"content-type", b"application/json"), (b"anthropic-version", b"2023-06-01")]
STREAM_EVENTS = pydantic.TypeAdapter(RawMessageStreamEvent)


def parse(body: dict[str, Any], path: bytes = b"/v1/messages", headers: Any = None) -> CanonicalRequest:
    return FRONTEND.parse(path, body_bytes(body), HEADERS if headers is None else headers)


def simple(**fields: Any) -> dict[str, Any]:
    return {"model": "claude-x", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}], **fields}


def encode(events: Iterable[Event], request: CanonicalRequest | None = None) -> bytes:
    encoder = FRONTEND.encoder(request or parse(simple(stream=True)))
    return b"".join(encoder.encode(e) for e in events) + encoder.end()


def sdk_client(body: bytes, content_type: str = "text/event-stream") -> anthropic.Anthropic:
    """The official client, answered by ``body`` (no network: the SDK's own transport hook)."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": content_type}, content=body)

    http = httpx2.Client(transport=httpx2.MockTransport(handler))
    return anthropic.Anthropic(
        api_key="sk-ant-test", base_url="http://gateway.test", http_client=http, max_retries=0
    )


def sse_events(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Each framed event as (event name, JSON), checking the frame is exactly Anthropic's."""
    assert data.endswith(b"\n\n")
    out = []
    for frame in data[:-2].split(b"\n\n"):
        name_line, data_line = frame.split(b"\n")
        assert name_line.startswith(b"event: ") and data_line.startswith(b"data: ")
        payload = json.loads(data_line[6:])
        assert payload["type"] == name_line[7:].decode()
        out.append((name_line[7:].decode(), payload))
    return out


# -- parsing ----------------------------------------------------------------------------------------------


def test_a_minimal_request_parses_with_usage_version_and_betas() -> None:
    headers = [*HEADERS, (b"Anthropic-Beta", b"a-1, b-2"), (b"anthropic-beta", b"c-3,a-1")]
    request = parse(simple(stream=True), path=b"/v1/messages?beta=true", headers=headers)
    assert request.protocol == "anthropic.messages"
    assert request.model == "claude-x" and request.max_tokens == 64 and request.stream
    assert request.messages == [Message(role="user", content=[{"type": "text", "text": "Hi"}])]
    assert request.include_usage is True
    assert request.version == "2023-06-01"
    assert request.betas == ["a-1", "b-2", "c-3"]
    assert request.extras == {}
    assert request.raw == body_bytes(simple(stream=True))


def test_the_registry_names_this_frontend() -> None:
    assert resolve(FRONTENDS["anthropic"]) is AnthropicFrontend
    assert FRONTEND.family == "anthropic"
    assert FRONTEND.heartbeat == b'event: ping\ndata: {"type": "ping"}\n\n'


def test_fields_map_to_their_slots() -> None:
    request = parse(
        simple(
            system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            stop_sequences=["\n\nHuman:", "END"],
            temperature=0.5,
            top_p=0.9,
            top_k=40,
            metadata={"user_id": "u1"},
            tools=[
                {
                    "name": "get_weather",
                    "description": "Weather",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                    "cache_control": {"type": "ephemeral"},
                }
            ],
            tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
            thinking={"type": "enabled", "budget_tokens": 2048},
        )
    )
    assert request.system == [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    assert request.stop == ["\n\nHuman:", "END"]
    assert (request.temperature, request.top_p, request.top_k) == (0.5, 0.9, 40)
    assert request.metadata == {"user_id": "u1"}
    [tool] = request.tools
    assert (tool.name, tool.description) == ("get_weather", "Weather")
    assert tool.parameters == {"type": "object", "properties": {"city": {"type": "string"}}}
    assert tool.extra == {"cache_control": {"type": "ephemeral"}}
    assert request.tool_choice == ToolChoice(type="tool", name="get_weather", disable_parallel=True)
    assert request.thinking == Thinking(enabled=True, budget_tokens=2048)
    assert request.extras == {}


@pytest.mark.parametrize(
    ("thinking", "canonical", "kept"),
    [
        ({"type": "enabled", "budget_tokens": 1024}, Thinking(enabled=True, budget_tokens=1024), False),
        ({"type": "adaptive"}, Thinking(enabled=True), False),
        ({"type": "disabled"}, Thinking(enabled=False), False),
        ({"type": "adaptive", "display": "omitted"}, Thinking(enabled=True), True),
        ({"type": "between_tools"}, Thinking(enabled=True), True),
    ],
)
def test_thinking_configs(thinking: dict[str, Any], canonical: Thinking, kept: bool) -> None:
    request = parse(simple(thinking=thinking))
    assert request.thinking == canonical
    assert ("thinking" in request.extras) is kept


def test_a_string_system_and_empty_strings() -> None:
    request = parse(
        simple(
            system="You are terse.",
            messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}],
        )
    )
    assert request.system == [{"type": "text", "text": "You are terse."}]
    assert request.messages[1] == Message(role="assistant", content=[])
    assert parse(simple(system="")).system == []


def test_the_coding_agent_request_parses() -> None:
    body = coding_agent_request()
    raw = body_bytes(body)
    assert len(raw) >= 85_000
    headers = [*HEADERS, (b"anthropic-beta", ",".join(BETAS).encode()), (b"x-api-key", b"sk-ant-x")]
    request = FRONTEND.parse(b"/v1/messages?beta=true", raw, headers)
    assert request.betas == BETAS
    assert request.stream and request.max_tokens == 32000
    assert request.thinking == Thinking(enabled=True)
    assert len(body["tools"]) == 25
    assert [t.name for t in request.tools] == [f"Tool{i:02d}" for i in range(24)]
    assert request.tools[23].extra == {"cache_control": {"type": "ephemeral"}}
    assert request.extras["tools"] == body["tools"]  # the server tool and the order survive as sent
    for name in ("context_management", "output_config", "service_tier", "container", "mcp_servers", "speed"):
        assert request.extras[name] == body[name]
    roles = [m.role for m in request.messages]
    assert roles == ["user", "assistant", "user", "system", "assistant", "user", "system", "user"]
    assert request.messages[3].content == [
        {"type": "text", "text": "The user has switched to plan mode. Do not edit files."}
    ]
    kinds = [b["type"] for b in request.messages[1].content]
    assert kinds == ["thinking", "redacted_thinking", "text", "tool_use"]
    assert request.messages[5].content[2]["type"] == "search_result"  # a block type the seam does not read


def test_count_tokens_takes_no_max_tokens() -> None:
    body = {
        "model": "claude-x",
        "messages": [{"role": "user", "content": "Hi"}],
        "tools": [],
        "max_tokens": 5,
    }
    for request in (
        FRONTEND.parse_count_tokens(body_bytes(body), HEADERS),
        FRONTEND.parse(b"/v1/messages/count_tokens?beta=true", body_bytes(body), HEADERS),
    ):
        assert request.max_tokens is None and not request.stream
        assert "max_tokens" not in request.extras
        assert request.messages[0].content == [{"type": "text", "text": "Hi"}]
    assert json.loads(FRONTEND.count_tokens_body(42)) == {"input_tokens": 42}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (
            body_bytes({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
            "model: Field required",
        ),
        (
            body_bytes({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
            "max_tokens: Field required",
        ),
        (body_bytes(simple(max_tokens=0)), "max_tokens: Input should be greater than or equal to 1"),
        (body_bytes(simple(max_tokens="64")), "max_tokens: Input should be a valid integer"),
        (body_bytes(simple(max_tokens=True)), "max_tokens: Input should be a valid integer"),
        (body_bytes(simple(max_tokens=6.5)), "max_tokens: Input should be a valid integer"),
        (body_bytes(simple(messages=[])), "messages: at least one message is required"),
        (body_bytes(simple(messages={"role": "user"})), "messages: Input should be a valid list"),
        (body_bytes(simple(messages=[{"role": "tool", "content": "x"}])), "messages.0.role"),
        (body_bytes(simple(messages=[{"role": "user"}])), "messages.0.content: Field required"),
        (body_bytes(simple(messages=[{"role": "user", "content": 5}])), "messages.0.content"),
        (
            body_bytes(simple(messages=[{"role": "user", "content": [{"type": "text"}]}])),
            "messages.0.content.0.text.text: Field required",
        ),
        (
            body_bytes(
                simple(
                    messages=[
                        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f"}]}
                    ]
                )
            ),
            "messages.0.content.0.tool_use.input: Field required",
        ),
        (body_bytes(simple(messages=[{"role": "user", "content": [{"text": "x"}]}])), "type: Field required"),
        (body_bytes(simple(system=5)), "system"),
        (body_bytes(simple(temperature="hot")), "temperature: Input should be a valid number"),
        (body_bytes(simple(top_k=1.5)), "top_k: Input should be a valid integer"),
        (body_bytes(simple(stream="yes")), "stream: Input should be a valid boolean"),
        (body_bytes(simple(stop_sequences="END")), "stop_sequences"),
        (body_bytes(simple(metadata=["u"])), "metadata"),
        (body_bytes(simple(tools=[{"description": "x", "input_schema": {}}])), "tools.0.custom.name"),
        (body_bytes(simple(tools=[{"name": "f"}])), "tools.0.custom.input_schema: Field required"),
        (body_bytes(simple(tool_choice={"type": "required"})), "tool_choice.type"),
        (body_bytes(simple(tool_choice={"type": "tool"})), "tool_choice.tool.name: Field required"),
        (body_bytes(simple(thinking={"type": "enabled"})), "thinking.enabled.budget_tokens: Field required"),
        (body_bytes(simple(thinking={"budget_tokens": 5})), "thinking.type: Field required"),
    ],
)
def test_invalid_requests_are_refused_with_anthropics_words(body: bytes, words: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        FRONTEND.parse(b"/v1/messages", body, HEADERS)
    assert words in caught.value.message
    assert caught.value.status == 400


def test_unknown_fields_and_block_types_pass() -> None:
    request = parse(
        simple(
            messages=[
                {"role": "user", "content": [{"type": "container_upload", "file_id": "f1"}]},
                {
                    "role": "assistant",
                    "content": [{"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}],
                },
                {"role": "user", "content": "ok"},
            ],
            inference_geo="us",
            cache_control={"type": "ephemeral"},
            some_future_field={"x": 1},
        )
    )
    assert request.extras == {
        "inference_geo": "us",
        "cache_control": {"type": "ephemeral"},
        "some_future_field": {"x": 1},
    }
    assert request.messages[0].content == [{"type": "container_upload", "file_id": "f1"}]


# -- streaming --------------------------------------------------------------------------------------------


def agentic_events() -> list[Event]:
    """An answer of thinking, text, two tool calls; usage last, after the finish (as OpenAI backends send)."""
    return [
        Start(id="chatcmpl-9x2", model="claude-x-upstream"),
        Usage(input_tokens=120, output_tokens=None, cached_input_tokens=60, cache_creation_input_tokens=10),
        ReasoningDelta("Let me think about "),
        ReasoningDelta("München."),
        ReasoningSignature("sig-abc"),
        TextDelta("I'll check ", choice=0),
        TextDelta("the weather 🌍.\n    indented", choice=0),
        TextDelta("other choice", choice=1),
        Logprobs(content=[]),
        ToolCallDelta(index=0, id="call_1", name="get_weather", arguments=""),
        ToolCallDelta(index=0, arguments='{"city": "Mü'),
        ToolCallDelta(index=0, arguments='nchen"}'),
        ToolCallDelta(index=1, id="call_2", name="get_time", arguments='{"tz": "CET"}'),
        Finish(reason="tool_calls", native="tool_calls"),
        Finish(reason="length", choice=1),
        Usage(input_tokens=120, output_tokens=57, cached_input_tokens=60, cache_creation_input_tokens=10),
        End(),
    ]


def test_the_sdk_accumulates_the_stream_to_the_whole_answer() -> None:
    data = encode(agentic_events())
    client = sdk_client(data)
    with client.messages.stream(
        model="claude-x", max_tokens=64, messages=[{"role": "user", "content": "Weather?"}]
    ) as stream:
        texts = list(stream.text_stream)
        message = stream.get_final_message()
    assert "".join(texts) == "I'll check the weather 🌍.\n    indented"
    assert message.id == "msg_chatcmpl-9x2"
    assert message.model == "claude-x-upstream"
    blocks = [b.model_dump(exclude_none=True) for b in message.content]
    assert blocks == [
        {"type": "thinking", "thinking": "Let me think about München.", "signature": "sig-abc"},
        {"type": "text", "text": "I'll check the weather 🌍.\n    indented"},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "München"}},
        {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {"tz": "CET"}},
    ]
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    usage = message.usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (
        50,
        60,
        10,
    )
    assert usage.output_tokens == 57


def test_every_event_is_a_valid_sdk_event_with_running_indices() -> None:
    data = encode(agentic_events())
    events = sse_events(data)
    for _, payload in events:
        STREAM_EVENTS.validate_python(payload)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    opened = [p["index"] for n, p in events if n == "content_block_start"]
    closed = [p["index"] for n, p in events if n == "content_block_stop"]
    assert opened == closed == [0, 1, 2, 3]
    for name, payload in events:
        if name == "content_block_delta":
            assert payload["index"] in opened
    start = events[0][1]["message"]
    assert start["usage"] == {
        "input_tokens": 50,
        "cache_creation_input_tokens": 10,
        "cache_read_input_tokens": 60,
        "output_tokens": 0,
    }
    assert start["content"] == [] and start["stop_reason"] is None and start["role"] == "assistant"
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 57
    assert b"other choice" not in data


def test_a_text_answer_is_framed_byte_for_byte() -> None:
    request = parse(simple(stream=True))
    data = encode(
        [
            Start(id="msg_01ABC", model="claude-x"),
            Usage(input_tokens=12),
            TextDelta("Hello"),
            TextDelta(", world"),
            Finish(reason="stop_sequence", stop_sequence="END", native="stop_sequence"),
            Usage(input_tokens=12, output_tokens=4),
        ],
        request,
    )
    assert data == (
        b"event: message_start\n"
        b'data: {"type":"message_start","message":{"id":"msg_01ABC","type":"message","role":"assistant",'
        b'"model":"claude-x","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":12,'
        b'"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":0}}}\n\n'
        b"event: content_block_start\n"
        b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
        b"event: content_block_delta\n"
        b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}\n\n'
        b"event: content_block_delta\n"
        b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":", world"}}\n\n'
        b"event: content_block_stop\n"
        b'data: {"type":"content_block_stop","index":0}\n\n'
        b"event: message_delta\n"
        b'data: {"type":"message_delta","delta":{"stop_reason":"stop_sequence","stop_sequence":"END"},'
        b'"usage":{"input_tokens":12,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":4}}\n\n'
        b"event: message_stop\n"
        b'data: {"type":"message_stop"}\n\n'
    )


def test_message_start_waits_for_content_and_end_is_once() -> None:
    encoder = FRONTEND.encoder(parse(simple(stream=True)))
    assert encoder.encode(Start(id="msg_1", model="m")) == b""
    assert encoder.encode(Usage(input_tokens=3)) == b""
    first = encoder.encode(TextDelta("a"))
    assert first.startswith(b"event: message_start\n") and b'"input_tokens":3' in first
    assert encoder.encode(Finish(reason="end")).startswith(b"event: content_block_stop\n")
    end = encoder.end()
    assert end.startswith(b"event: message_delta\n") and end.endswith(
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    assert encoder.end() == b""
    assert encoder.encode(TextDelta("late")) == b""


def test_an_empty_answer_is_still_a_whole_message() -> None:
    data = encode([Start(id="x", model="m"), Finish(reason="length")])
    message = sdk_client(data).messages.create(
        model="m", max_tokens=1, messages=[{"role": "user", "content": "x"}], stream=True
    )
    names = [e.type for e in message]
    assert names == ["message_start", "message_delta", "message_stop"]
    assert b'"stop_reason":"max_tokens"' in data


@pytest.mark.parametrize(
    ("reason", "native", "expected"),
    [
        ("end", None, "end_turn"),
        ("end", "stop", "end_turn"),
        ("stop_sequence", None, "stop_sequence"),
        ("length", None, "max_tokens"),
        ("length", "model_context_window_exceeded", "model_context_window_exceeded"),
        ("tool_calls", None, "tool_use"),
        ("content_filter", "content_filter", "refusal"),
        ("refusal", None, "refusal"),
        ("pause", None, "pause_turn"),
    ],
)
def test_stop_reasons(reason: str, native: str | None, expected: str) -> None:
    data = encode([Start(id="msg_1", model="m"), TextDelta("x"), Finish(reason=reason, native=native)])
    assert sse_events(data)[-2][1]["delta"]["stop_reason"] == expected
    body = json.loads(
        FRONTEND.response(parse(simple()), [TextDelta("x"), Finish(reason=reason, native=native)])
    )
    assert body["stop_reason"] == expected


def test_thinking_edges_signature_alone_and_redacted_blocks() -> None:
    data = encode(
        [
            Start(id="msg_1", model="m"),
            ReasoningSignature("only-sig"),
            RedactedReasoning("opaque=="),
            ReasoningDelta("second "),
            ReasoningSignature("sig2"),
            ReasoningDelta("third"),
            TextDelta("done"),
        ]
    )
    message = sdk_client(data).messages.stream(
        model="m", max_tokens=9, messages=[{"role": "user", "content": "x"}]
    )
    with message as stream:
        final = stream.get_final_message()
    assert [b.model_dump(exclude_none=True) for b in final.content] == [
        {"type": "thinking", "thinking": "", "signature": "only-sig"},
        {"type": "redacted_thinking", "data": "opaque=="},
        {"type": "thinking", "thinking": "second ", "signature": "sig2"},
        {"type": "thinking", "thinking": "third", "signature": ""},
        {"type": "text", "text": "done"},
    ]


def test_an_in_band_error_is_anthropics_and_ends_the_stream() -> None:
    encoder = FRONTEND.encoder(parse(simple(stream=True)))
    out = encoder.encode(Start(id="msg_1", model="m")) + encoder.encode(TextDelta("partial"))
    error = encoder.error("backend went away", "overloaded")
    assert error == (
        b"event: error\n"
        b'data: {"type":"error","error":{"type":"overloaded_error","message":"backend went away"}}\n\n'
    )
    assert encoder.end() == b"" and encoder.error("again") == b""
    with (
        pytest.raises(anthropic.APIStatusError) as caught,
        sdk_client(out + error).messages.stream(
            model="m", max_tokens=9, messages=[{"role": "user", "content": "x"}]
        ) as stream,
    ):
        stream.get_final_message()
    assert "backend went away" in str(caught.value)
    in_band = FRONTEND.encoder(parse(simple(stream=True))).encode(StreamError("boom", "server_error"))
    assert json.loads(in_band.split(b"data: ")[1])["error"] == {"type": "api_error", "message": "boom"}


def test_ids_are_anthropics() -> None:
    for given, expected in (("msg_01X", "msg_01X"), ("chatcmpl-a1.b2", "msg_chatcmpl-a1b2")):
        data = encode([Start(id=given, model="m"), TextDelta("x")])
        assert sse_events(data)[0][1]["message"]["id"] == expected
    data = encode([TextDelta("no start")])
    start = sse_events(data)[0][1]["message"]
    assert start["id"].startswith("msg_") and len(start["id"]) > 10 and start["model"] == "claude-x"
    tool = encode([Start(id="msg_1", model="m"), ToolCallDelta(index=0, name="f", arguments="{}")])
    assert sse_events(tool)[1][1]["content_block"]["id"].startswith("toolu_")


# -- whole answers, errors, models ------------------------------------------------------------------------


def test_a_whole_answer_is_a_valid_message() -> None:
    body = FRONTEND.response(parse(simple()), agentic_events())
    message = SDKMessage.model_validate_json(body)
    assert message.id == "msg_chatcmpl-9x2" and message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use", "tool_use"]
    tool = message.content[2]
    assert (tool.type, tool.id, tool.name, tool.input) == (
        "tool_use",
        "call_1",
        "get_weather",
        {"city": "München"},
    )  # type: ignore[union-attr]
    assert message.usage.input_tokens == 50 and message.usage.output_tokens == 57
    parsed = sdk_client(body, "application/json").messages.create(
        model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
    )
    assert parsed.content[1].text == "I'll check the weather 🌍.\n    indented"  # type: ignore[union-attr]


def test_a_tool_call_whose_arguments_are_not_an_object_is_malformed() -> None:
    for arguments in ('{"a": ', "[1]"):
        with pytest.raises(MalformedEvent):
            FRONTEND.response(
                parse(simple()), [ToolCallDelta(index=0, id="t", name="f", arguments=arguments)]
            )
    body = json.loads(FRONTEND.response(parse(simple()), [ToolCallDelta(index=0, id="t", name="f")]))
    assert body["content"] == [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]


@pytest.mark.parametrize(
    ("status", "given", "expected"),
    [
        (400, None, "invalid_request_error"),
        (400, "invalid_request_error", "invalid_request_error"),
        (401, "authentication_error", "authentication_error"),
        (403, None, "permission_error"),
        (404, "invalid_request_error", "not_found_error"),
        (413, None, "request_too_large"),
        (422, None, "invalid_request_error"),
        (429, "rate_limit_error", "rate_limit_error"),
        (500, None, "api_error"),
        (502, None, "api_error"),
        (503, "rate_limit_error", "overloaded_error"),
        (504, None, "timeout_error"),
        (529, None, "overloaded_error"),
        (599, None, "api_error"),
    ],
)
def test_error_bodies(status: int, given: str | None, expected: str) -> None:
    body = json.loads(FRONTEND.error(status, "went wrong", error_type=given))
    assert body == {"type": "error", "error": {"type": expected, "message": "went wrong"}}


def test_error_bodies_become_the_sdks_exceptions() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(
            529, headers={"content-type": "application/json"}, content=FRONTEND.error(529, "busy")
        )

    http = httpx2.Client(transport=httpx2.MockTransport(handler))
    client = anthropic.Anthropic(api_key="k", base_url="http://gateway.test", http_client=http, max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as caught:
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 529
    assert caught.value.body == {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}


def test_models_in_anthropics_shape() -> None:
    body = FRONTEND.models_body(["claude-a", "claude-b"])
    page = sdk_client(body, "application/json").models.list()
    assert [m.id for m in page.data] == ["claude-a", "claude-b"]
    assert all(m.type == "model" and m.display_name == m.id for m in page.data)
    assert json.loads(body)["first_id"] == "claude-a" and json.loads(body)["last_id"] == "claude-b"
    assert json.loads(body)["has_more"] is False
    assert json.loads(FRONTEND.models_body([])) == {
        "data": [],
        "has_more": False,
        "first_id": None,
        "last_id": None,
    }
