"""The Anthropic Messages backend adapter: requests as Anthropic takes them, its streams and errors read."""

from __future__ import annotations

import json
from typing import Any

import pytest

from skyfabric.core.endpoints import Endpoint
from skyfabric.core.errors import MalformedEvent
from skyfabric.protocols.backends.anthropic import AnthropicBackend, prefill_supported
from skyfabric.protocols.canonical import (
    CanonicalRequest,
    End,
    Event,
    Finish,
    Message,
    PartEnd,
    PartStart,
    ReasoningDelta,
    ReasoningSignature,
    RedactedReasoning,
    Start,
    StreamError,
    TextDelta,
    Thinking,
    Tool,
    ToolCallDelta,
    ToolChoice,
    Usage,
)
from skyfabric.protocols.frontends.anthropic import AnthropicFrontend
from skyfabric.protocols.progress import Part, Progress
from skyfabric.protocols.registry import backend as registry_backend
from tests.protocols.anthropic_samples import (
    BETAS,
    CAPTURED_ARGUMENTS,
    CAPTURED_SIGNATURE,
    CAPTURED_STREAM,
    CAPTURED_TEXT,
    CAPTURED_THINKING,
    body_bytes,
    coding_agent_request,
    frame,
)

BACKEND = AnthropicBackend("anthropic")
FRONTEND = AnthropicFrontend()


def endpoint(
    upstream_model: str = "claude-sonnet-4-5-20250929", api_key: str | None = "sk-ant-upstream"
) -> Endpoint:
    return Endpoint(
        provider="anthropic",
        region="us",
        pool="claude",
        index=0,
        url="https://api.anthropic.com/v1",
        model="claude",
        upstream_model=upstream_model,
        engine="anthropic",
        accelerator="none",
        can_continue=True,
        concurrency=8,
        price_per_hour=0.0,
        api_key=api_key,
    )


def anthropic_request(
    body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> CanonicalRequest:
    return FRONTEND.parse(
        b"/v1/messages", body_bytes(body), headers or [(b"anthropic-version", b"2023-06-01")]
    )


def sent(call: Any) -> dict[str, Any]:
    return json.loads(call.body)  # type: ignore[no-any-return]


def header(call: Any, name: bytes) -> bytes | None:
    values = [v for k, v in call.headers if k == name]
    assert len(values) <= 1
    return values[0] if values else None


def as_blocks(message: dict[str, Any]) -> dict[str, Any]:
    content = message["content"]
    if isinstance(content, str):
        content = [{"type": "text", "text": content}] if content else ""
    return {**message, "content": content}


def decode_all(chunks: list[bytes]) -> tuple[bytes, list[Event]]:
    decoder = BACKEND.decoder()
    raw = b""
    events: list[Event] = []
    for chunk in chunks:
        for data, found in decoder.feed(chunk):
            raw += data
            events.extend(found)
    return raw, events


# -- capabilities and building ----------------------------------------------------------------------------


def test_the_registry_builds_this_adapter() -> None:
    adapter = registry_backend("anthropic")
    assert isinstance(adapter, AnthropicBackend) and adapter.family == "anthropic"


def test_capabilities() -> None:
    caps = BACKEND.capabilities(endpoint())
    assert caps.continues == frozenset({"text"})
    assert caps.tools and caps.thinking and caps.images and caps.betas
    assert not caps.n and not caps.logprobs
    assert BACKEND.capabilities(endpoint("claude-opus-4-6")).continues == frozenset()


@pytest.mark.parametrize(
    ("model", "supported"),
    [
        ("claude-sonnet-4-5-20250929", True),
        ("claude-sonnet-4-20250514", True),
        ("claude-3-7-sonnet-20250219", True),
        ("claude-opus-4-1", True),
        ("claude-haiku-4-5", True),
        ("claude-opus-4-6", False),
        ("claude-sonnet-4-6", False),
        ("claude-opus-4-8", False),
        ("anthropic.claude-opus-4-6-v1:0", False),
        ("claude-sonnet-5", False),
        ("qwen3-coder", True),
    ],
)
def test_which_models_take_a_prefill(model: str, supported: bool) -> None:
    assert prefill_supported(model) is supported


def test_headers_carry_the_key_the_version_and_the_betas() -> None:
    headers = [(b"anthropic-version", b"2023-06-01"), (b"anthropic-beta", ",".join(BETAS).encode())]
    call = BACKEND.build(anthropic_request({**coding_agent_request()}, headers), endpoint())
    assert call.path == b"/messages"
    assert header(call, b"content-type") == b"application/json"
    assert header(call, b"accept") == b"text/event-stream"
    assert header(call, b"x-api-key") == b"sk-ant-upstream"
    assert header(call, b"anthropic-version") == b"2023-06-01"
    assert header(call, b"anthropic-beta") == ",".join(BETAS).encode()
    plain = BACKEND.build(
        CanonicalRequest(
            protocol="openai.chat", model="m", messages=[Message("user", [{"type": "text", "text": "x"}])]
        ),
        endpoint(api_key=None),
    )
    assert header(plain, b"x-api-key") is None and header(plain, b"anthropic-beta") is None
    assert (
        header(plain, b"anthropic-version") == b"2023-06-01"
        and header(plain, b"accept") == b"application/json"
    )


def test_an_anthropic_clients_request_goes_out_as_it_came() -> None:
    original = coding_agent_request()
    call = BACKEND.build(anthropic_request(original), endpoint("claude-opus-4-6"))
    body = sent(call)
    expected = {**original, "model": "claude-opus-4-6"}
    assert {k: v for k, v in body.items() if k != "messages"} == {
        k: v for k, v in expected.items() if k != "messages"
    }
    assert body["messages"] == [as_blocks(m) for m in original["messages"]]
    assert body["tools"][5] == {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}


def test_an_anthropic_round_trip_of_fields_the_seam_slots() -> None:
    original = {
        "model": "claude-x",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "system": [{"type": "text", "text": "S", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        "stop_sequences": ["END"],
        "temperature": 0.2,
        "top_p": 0.8,
        "top_k": 5,
        "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}, "strict": True}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "thinking": {"type": "enabled", "budget_tokens": 2000},
        "metadata": {"user_id": "u"},
    }
    assert sent(BACKEND.build(anthropic_request(original), endpoint("up"))) == {**original, "model": "up"}


def openai_request(**fields: Any) -> CanonicalRequest:
    return CanonicalRequest(protocol="openai.chat", model="claude", **fields)


def test_another_protocols_request_is_translated() -> None:
    request = openai_request(
        system=[{"type": "text", "text": "Be brief."}],
        messages=[
            Message("user", [{"type": "text", "text": "Weather in Paris and Rome?"}]),
            Message("user", [{"type": "text", "text": "Quickly."}]),
            Message(
                "assistant",
                [
                    {"type": "text", "text": ""},
                    {"type": "thinking", "thinking": "unsigned"},
                    {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "call_2", "name": "weather", "input": {"city": "Rome"}},
                ],
            ),
            Message("tool", [{"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"}]),
            Message("tool", [{"type": "tool_result", "tool_use_id": "call_2", "content": "rain"}]),
            Message("system", [{"type": "text", "text": "Answer in French."}]),
            Message("assistant", [{"type": "text", "text": "Voici:  \n"}]),
        ],
        max_tokens=None,
        temperature=1.5,
        top_p=0.9,
        stop=["END"],
        seed=7,
        n=1,
        logprobs=True,
        tools=[Tool("weather", "Weather", {"type": "object", "properties": {}}, extra={"strict": True})],
        tool_choice=ToolChoice("auto", disable_parallel=True),
        metadata={"user": "alice"},
        extras={"logit_bias": {"1": 2}, "presence_penalty": 0.5},
        stream=True,
        include_usage=True,
    )
    body = sent(BACKEND.build(request, endpoint("claude-sonnet-4-5")))
    assert body == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 4096,
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather in Paris and Rome?"},
                    {"type": "text", "text": "Quickly."},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "call_2", "name": "weather", "input": {"city": "Rome"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "rain"},
                    {"type": "text", "text": "<system-reminder>\nAnswer in French.\n</system-reminder>"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Voici:"}]},
        ],
        "stop_sequences": ["END"],
        "temperature": 1.0,
        "top_p": 0.9,
        "tools": [
            {
                "name": "weather",
                "description": "Weather",
                "input_schema": {"type": "object", "properties": {}},
            }
        ],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "metadata": {"user_id": "alice"},
        "stream": True,
    }


def test_translated_thinking_keeps_its_budget_below_max_tokens() -> None:
    user = [Message("user", [{"type": "text", "text": "x"}])]
    effort = sent(
        BACKEND.build(
            openai_request(messages=user, thinking=Thinking(effort="high"), temperature=0.3), endpoint()
        )
    )
    assert effort["thinking"] == {"type": "enabled", "budget_tokens": 16384}
    assert effort["max_tokens"] == 4096 + 16384
    assert "temperature" not in effort  # Anthropic refuses sampling settings with thinking on
    tight = sent(
        BACKEND.build(
            openai_request(messages=user, thinking=Thinking(budget_tokens=8000), max_tokens=3000), endpoint()
        )
    )
    assert tight["thinking"] == {"type": "enabled", "budget_tokens": 2999} and tight["max_tokens"] == 3000
    tiny = sent(
        BACKEND.build(
            openai_request(messages=user, thinking=Thinking(effort="low"), max_tokens=500), endpoint()
        )
    )
    assert "thinking" not in tiny
    off = sent(
        BACKEND.build(
            openai_request(messages=user, thinking=Thinking(enabled=False), temperature=0.3), endpoint()
        )
    )
    assert off["thinking"] == {"type": "disabled"} and off["temperature"] == 0.3
    none = sent(BACKEND.build(openai_request(messages=user, tool_choice=ToolChoice("none")), endpoint()))
    assert "tool_choice" not in none  # no tools: Anthropic would refuse a tool_choice


def test_count_tokens_sends_only_what_that_endpoint_takes() -> None:
    body = {
        "model": "claude-x",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "system": "S",
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": []},
    }
    request = FRONTEND.parse_count_tokens(body_bytes(body), [])
    call = BACKEND.build_count_tokens(request, endpoint("up"))
    assert call.path == b"/messages/count_tokens"
    assert header(call, b"accept") == b"application/json"
    assert sent(call) == {**body, "model": "up", "system": [{"type": "text", "text": "S"}]}


# -- continuation -----------------------------------------------------------------------------------------


def progress_of(*parts: Part) -> Progress:
    return Progress(id="msg_1", model="m", parts=list(parts))


def test_a_text_answer_continues_from_a_prefill_without_trailing_whitespace() -> None:
    request = anthropic_request(
        {
            "model": "claude",
            "max_tokens": 200,
            "messages": [{"role": "user", "content": "Write code"}],
            "stream": True,
        }
    )
    text = "def f():\n    return 1\n    "
    call = BACKEND.continuation(request, endpoint(), progress_of(Part("text", text=text)), tokens_sent=50)
    assert call is not None and call.path == b"/messages"
    body = sent(call)
    assert body["messages"][-1] == {"role": "assistant", "content": "def f():\n    return 1"}
    assert body["max_tokens"] == 150 and body["stream"] is True
    unknown = BACKEND.continuation(
        request, endpoint(), progress_of(Part("text", text=text)), tokens_sent=None
    )
    assert unknown is not None and sent(unknown)["max_tokens"] == 200
    assert (
        BACKEND.continuation(request, endpoint(), progress_of(Part("text", text=text)), tokens_sent=200)
        is None
    )


def test_a_clients_own_prefill_is_extended() -> None:
    request = anthropic_request(
        {
            "model": "claude",
            "max_tokens": 50,
            "messages": [{"role": "user", "content": "JSON please"}, {"role": "assistant", "content": "{"}],
        }
    )
    call = BACKEND.continuation(
        request, endpoint(), progress_of(Part("text", text='"a": 1, ')), tokens_sent=3
    )
    assert call is not None
    assert sent(call)["messages"][-1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": '{"a": 1,'}],
    }


@pytest.mark.parametrize(
    ("parts", "fields", "model"),
    [
        ([Part("reasoning", text="hmm", signature="s"), Part("text", text="Hi")], {}, "claude-sonnet-4-5"),
        (
            [Part("text", text="Calling"), Part("tool", text='{"a"', id="t", name="f")],
            {},
            "claude-sonnet-4-5",
        ),
        ([Part("redacted", data="x"), Part("text", text="Hi")], {}, "claude-sonnet-4-5"),
        (
            [Part("text", text="Hi")],
            {"thinking": {"type": "enabled", "budget_tokens": 1024}},
            "claude-sonnet-4-5",
        ),
        (
            [Part("text", text="Hi")],
            {"thinking": {"type": "adaptive", "display": "omitted"}},
            "claude-sonnet-4-5",
        ),
        ([Part("text", text="Hi")], {"tool_choice": {"type": "any"}, "tools": []}, "claude-sonnet-4-5"),
        ([Part("text", text="Hi")], {}, "claude-opus-4-6"),
        ([Part("text", text="  \n ")], {}, "claude-sonnet-4-5"),
        ([], {}, "claude-sonnet-4-5"),
    ],
)
def test_what_is_not_continued_natively_is_replayed(
    parts: list[Part], fields: dict[str, Any], model: str
) -> None:
    request = anthropic_request(
        {"model": "claude", "max_tokens": 50, "messages": [{"role": "user", "content": "x"}], **fields}
    )
    assert BACKEND.continuation(request, endpoint(model), progress_of(*parts), tokens_sent=1) is None


def test_a_translated_request_continues_with_the_default_max_tokens() -> None:
    request = openai_request(messages=[Message("user", [{"type": "text", "text": "x"}])])
    call = BACKEND.continuation(request, endpoint(), progress_of(Part("text", text="Hello ")), tokens_sent=96)
    assert call is not None
    body = sent(call)
    assert body["max_tokens"] == 4000
    assert body["messages"][-1] == {"role": "assistant", "content": "Hello"}


# -- decoding ---------------------------------------------------------------------------------------------


EXPECTED_EVENTS: list[Event] = [
    Start(id="msg_01XFDUDYJgAACzvnptvVoYEL", model="claude-sonnet-4-5-20250929"),
    Usage(
        input_tokens=472 + 2048 + 100,
        output_tokens=None,
        cached_input_tokens=2048,
        cache_creation_input_tokens=100,
    ),
    PartStart("reasoning"),
    ReasoningDelta("The user wants the weather in München."),
    ReasoningDelta(" I should call the tool."),
    ReasoningSignature(CAPTURED_SIGNATURE),
    PartEnd(),
    PartStart("text"),
    TextDelta(CAPTURED_TEXT),
    PartEnd(),
    ToolCallDelta(index=0, id="toolu_01T1x1fJ34qAmk2tNTrN7Up6", name="get_weather", arguments=""),
    ToolCallDelta(index=0, arguments='{"location": "Mün'),
    ToolCallDelta(index=0, arguments='chen", "unit": "celsius"}'),
    PartEnd(),
    Finish(reason="tool_calls", native="tool_use"),
    Usage(input_tokens=2620, output_tokens=89, cached_input_tokens=2048, cache_creation_input_tokens=100),
    End(),
]


def test_a_captured_stream_decodes() -> None:
    raw, events = decode_all([CAPTURED_STREAM])
    assert raw == CAPTURED_STREAM
    assert events == EXPECTED_EVENTS


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n"])
def test_any_split_decodes_the_same_and_returns_every_byte_once(line_end: bytes) -> None:
    """Splits land mid-line, mid-UTF-8 character (ü, 🌍, —), mid-JSON string and between \\r and \\n."""
    stream = CAPTURED_STREAM.replace(b"\n", line_end)
    for at in range(1, len(stream)):
        raw, events = decode_all([stream[:at], stream[at:]])
        assert raw == stream, at
        assert events == EXPECTED_EVENTS, at
    raw, events = decode_all([stream[i : i + 1] for i in range(len(stream))])
    assert raw == stream and events == EXPECTED_EVENTS


def test_crlf_and_cr_line_ends_comments_and_unknown_events() -> None:
    crlf = CAPTURED_STREAM.replace(b"\n", b"\r\n")
    for chunks in ([crlf], [crlf[i : i + 7] for i in range(0, len(crlf), 7)], [crlf[:-1], crlf[-1:]]):
        raw, events = decode_all(chunks)
        assert raw == crlf and events == EXPECTED_EVENTS
    extra = (
        b": keep-alive comment\n\n"
        b'event: future_event\ndata: {"type":"future_event"}\n\n'
        b"\n" + CAPTURED_STREAM.replace(b"\n", b"\r")
    )
    raw, events = decode_all([extra[:5], extra[5:100], extra[100:]])
    assert raw == extra and events == EXPECTED_EVENTS


def test_decoded_events_track_progress() -> None:
    progress = Progress()
    for event in decode_all([CAPTURED_STREAM])[1]:
        progress.observe(event)
    assert [p.kind for p in progress.parts] == ["reasoning", "text", "tool"]
    assert progress.parts[0].text == CAPTURED_THINKING and progress.parts[0].signature == CAPTURED_SIGNATURE
    assert progress.text == CAPTURED_TEXT
    assert progress.parts[2].text == CAPTURED_ARGUMENTS and progress.parts[2].name == "get_weather"
    assert progress.segment_tokens == 89
    assert progress.finish is not None and progress.finish.reason == "tool_calls"


def test_the_frontends_stream_decodes_back_to_its_events() -> None:
    events: list[Event] = [
        Start(id="msg_9", model="m"),
        Usage(input_tokens=30, cached_input_tokens=20, cache_creation_input_tokens=0),
        ReasoningDelta("think"),
        ReasoningSignature("sig"),
        RedactedReasoning("enc"),
        TextDelta("text 🌍"),
        ToolCallDelta(index=0, id="toolu_1", name="f", arguments='{"x": '),
        ToolCallDelta(index=0, arguments="1}"),
        ToolCallDelta(index=1, id="toolu_2", name="g", arguments="{}"),
        Finish(reason="stop_sequence", stop_sequence="STOP"),
        Usage(input_tokens=30, output_tokens=12, cached_input_tokens=20),
    ]
    request = anthropic_request(
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    )
    encoder = FRONTEND.encoder(request)
    data = b"".join(encoder.encode(e) for e in events) + encoder.end()
    _, decoded = decode_all([data])
    assert decoded == [
        Start(id="msg_9", model="m"),
        Usage(input_tokens=30, output_tokens=None, cached_input_tokens=20),
        PartStart("reasoning"),
        ReasoningDelta("think"),
        ReasoningSignature("sig"),
        PartEnd(),
        RedactedReasoning("enc"),
        PartEnd(),
        PartStart("text"),
        TextDelta("text 🌍"),
        PartEnd(),
        ToolCallDelta(index=0, id="toolu_1", name="f"),
        ToolCallDelta(index=0, arguments='{"x": '),
        ToolCallDelta(index=0, arguments="1}"),
        PartEnd(),
        ToolCallDelta(index=1, id="toolu_2", name="g"),
        ToolCallDelta(index=1, arguments="{}"),
        PartEnd(),
        Finish(reason="stop_sequence", stop_sequence="STOP", native="stop_sequence"),
        Usage(input_tokens=30, output_tokens=12, cached_input_tokens=20),
        End(),
    ]


def test_an_error_event_is_a_stream_error() -> None:
    data = CAPTURED_STREAM.split(b"event: content_block_start")[0] + frame(
        '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    )
    _, events = decode_all([data])
    assert events[-1] == StreamError(message="Overloaded", type="overloaded_error")


TEXT_DELTA_0 = frame('{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x"}}')


@pytest.mark.parametrize(
    "data",
    [
        b"event: message_start\ndata: {not json\n\n",
        TEXT_DELTA_0,
        CAPTURED_STREAM.split(b"event: content_block_start")[0] + TEXT_DELTA_0,
        CAPTURED_STREAM.split(b"event: content_block_start")[0]
        + b'event: content_block_stop\ndata: {"type":"content_block_stop","index":3}\n\n',
        CAPTURED_STREAM.split(b"event: ping")[0] + TEXT_DELTA_0,
        CAPTURED_STREAM.split(b"event: ping")[0]
        + frame('{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}'),
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
        b"event: message_start\ndata: [1]\n\n",
    ],
)
def test_streams_out_of_anthropics_grammar_are_malformed(data: bytes) -> None:
    with pytest.raises(MalformedEvent):
        decode_all([data])


def test_blocks_the_seam_does_not_read_pass_silently() -> None:
    start = CAPTURED_STREAM.split(b"event: content_block_start")[0]
    data = start + (
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":'
        b'{"type":"server_tool_use","id":"srvtoolu_1","name":"web_search","input":{}}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":'
        b'{"type":"input_json_delta","partial_json":"{\\"query\\": \\"x\\"}"}}\n\n'
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
        b'event: content_block_start\ndata: {"type":"content_block_start","index":1,"content_block":'
        b'{"type":"text","text":"Found"}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,"delta":'
        b'{"type":"citations_delta","citation":{"type":"web_search_result_location"}}}\n\n'
    )
    raw, events = decode_all([data])
    assert raw == data
    assert events[2:] == [PartStart("text"), TextDelta("Found")]


def test_a_whole_message_decodes() -> None:
    body = json.dumps(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-x",
            "content": [
                {"type": "thinking", "thinking": "hm", "signature": "s"},
                {"type": "redacted_thinking", "data": "r"},
                {"type": "text", "text": "Hi"},
                {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": [1, "ü"]}},
            ],
            "stop_reason": "tool_use",
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 4},
        }
    ).encode()
    assert BACKEND.decode_response(body) == [
        Start(id="msg_1", model="claude-x"),
        ReasoningDelta("hm"),
        ReasoningSignature("s"),
        RedactedReasoning("r"),
        TextDelta("Hi"),
        ToolCallDelta(index=0, id="toolu_1", name="f", arguments='{"a":[1,"ü"]}'),
        Finish(reason="tool_calls", native="tool_use"),
        Usage(input_tokens=14, output_tokens=5, cached_input_tokens=4),
        End(),
    ]
    error = b'{"type":"error","error":{"type":"api_error","message":"Internal server error"}}'
    assert BACKEND.decode_response(error) == [StreamError("Internal server error", "api_error")]
    with pytest.raises(MalformedEvent):
        BACKEND.decode_response(b"<html>")


def test_a_whole_answer_crosses_back_unchanged() -> None:
    """Frontend body → backend events → frontend body: the same Message."""
    request = anthropic_request(
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    )
    events = decode_all([CAPTURED_STREAM])[1]
    body = json.loads(FRONTEND.response(request, events))
    again = json.loads(FRONTEND.response(request, BACKEND.decode_response(json.dumps(body).encode())))
    assert again == body
    assert body["usage"] == {
        "input_tokens": 472,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 2048,
        "output_tokens": 89,
    }
    assert body["content"][2]["input"] == json.loads(CAPTURED_ARGUMENTS)


# -- classification ---------------------------------------------------------------------------------------


def error_body(kind: str, message: str) -> bytes:
    return json.dumps(
        {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_1"}
    ).encode()


@pytest.mark.parametrize(
    ("status", "headers", "body", "verdict", "retry_after"),
    [
        (
            429,
            [(b"retry-after", b"17")],
            error_body("rate_limit_error", "Number of request tokens has exceeded"),
            "throttled",
            17.0,
        ),
        (529, [], error_body("overloaded_error", "Overloaded"), "overloaded", None),
        (503, [(b"retry-after", b"3")], error_body("overloaded_error", "Overloaded"), "overloaded", 3.0),
        (500, [], error_body("api_error", "Internal server error"), "retryable", None),
        (502, [], b"<html>Bad Gateway</html>", "retryable", None),
        (504, [], error_body("timeout_error", "Gateway timeout"), "retryable", None),
        (401, [], error_body("authentication_error", "invalid x-api-key"), "retryable", None),
        (403, [], error_body("permission_error", "Your API key does not have permission"), "retryable", None),
        (404, [], error_body("not_found_error", "model: claude-nope"), "retryable", None),
        (
            400,
            [],
            error_body("invalid_request_error", "prompt is too long: 209353 tokens > 199999 maximum"),
            "context_length",
            None,
        ),
        (
            400,
            [],
            error_body(
                "invalid_request_error",
                "input length and `max_tokens` exceed context limit: 178959 + 64000 > 200000, "
                "decrease input length or `max_tokens` and try again",
            ),
            "context_length",
            None,
        ),
        (
            400,
            [],
            error_body(
                "invalid_request_error",
                "This model does not support assistant message prefill. "
                "The conversation must end with a user message.",
            ),
            "retryable",
            None,
        ),
        (
            400,
            [],
            error_body("invalid_request_error", "messages.1.content.0.tool_use.input: Field required"),
            "client",
            None,
        ),
        (
            400,
            [],
            error_body("invalid_request_error", "max_tokens: 100000 > 64000, which is the maximum allowed"),
            "client",
            None,
        ),
        (413, [], error_body("request_too_large", "Request exceeds the maximum size"), "client", None),
        (422, [], b"not json", "client", None),
    ],
)
def test_classification(
    status: int, headers: list[tuple[bytes, bytes]], body: bytes, verdict: str, retry_after: float | None
) -> None:
    outcome = BACKEND.classify(status, headers, body)
    assert outcome.verdict == verdict
    assert outcome.retry_after == retry_after


def test_a_429_without_retry_after_waits_for_the_exhausted_limits_reset() -> None:
    backend = AnthropicBackend("anthropic", clock=lambda: 1_767_225_600.0)  # 2026-01-01T00:00:00Z
    headers = [
        (b"anthropic-ratelimit-requests-remaining", b"40"),
        (b"anthropic-ratelimit-requests-reset", b"2026-01-01T00:00:05Z"),
        (b"anthropic-ratelimit-input-tokens-remaining", b"0"),
        (b"anthropic-ratelimit-input-tokens-reset", b"2026-01-01T00:00:42Z"),
        (b"anthropic-ratelimit-output-tokens-remaining", b"0"),
        (b"anthropic-ratelimit-output-tokens-reset", b"2026-01-01T00:00:30Z"),
    ]
    assert backend.classify(429, headers, b"").retry_after == 42.0
    assert backend.classify(429, headers[:2], b"").retry_after == 5.0
    assert backend.classify(429, [], b"").retry_after is None
    past = [(b"anthropic-ratelimit-tokens-reset", b"2025-12-31T23:59:00Z")]
    assert backend.classify(429, past, b"").retry_after == 0.0
