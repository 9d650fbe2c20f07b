"""The OpenAI-compatible backend adapter: capabilities, pass-through and translated bodies, continuation
bodies per engine, the stream decoder on awkwardly split bytes, whole responses, and the classifier."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from skyfabric.core.endpoints import Endpoint
from skyfabric.core.errors import MalformedEvent
from skyfabric.protocols.backends.openai import OpenAIBackend
from skyfabric.protocols.canonical import (
    CanonicalRequest,
    End,
    Event,
    Finish,
    Logprobs,
    Message,
    ReasoningDelta,
    Start,
    StreamError,
    TextDelta,
    Thinking,
    Tool,
    ToolCallDelta,
    ToolChoice,
    Usage,
)
from skyfabric.protocols.frontends.openai import OpenAIFrontend
from skyfabric.protocols.progress import Part, Progress
from skyfabric.protocols.registry import backend

ENGINES = ("local", "vllm", "vllm-tpu", "vllm-neuron", "sglang", "tgi", "llama-cpp", "openai")
FRONT = OpenAIFrontend()


def endpoint(
    engine: str = "vllm", *, upstream: str = "m", can_continue: bool | None = None, api_key: str | None = None
) -> Endpoint:
    if can_continue is None:
        can_continue = engine in {"local", "vllm", "vllm-tpu", "vllm-neuron", "sglang"}
    return Endpoint(
        provider="p",
        region="r",
        pool="pool",
        index=0,
        url="http://127.0.0.1:9/v1",
        model="m",
        upstream_model=upstream,
        engine=engine,
        accelerator="cpu",
        can_continue=can_continue,
        concurrency=4,
        price_per_hour=0.0,
        api_key=api_key,
    )


def client_request(body: dict[str, Any], path: bytes = b"/v1/chat/completions") -> CanonicalRequest:
    return FRONT.parse(path, orjson.dumps(body), [])


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


# -- capabilities ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_kind_has_this_adapter_and_its_capabilities(engine: str) -> None:
    adapter = backend(engine)
    assert isinstance(adapter, OpenAIBackend) and adapter.family == "openai"
    caps = adapter.capabilities(endpoint(engine))
    expected = {
        "local": {"text", "reasoning", "tool"},
        "vllm": {"text"},
        "vllm-tpu": {"text"},
        "vllm-neuron": {"text"},
        "sglang": {"text"},
    }.get(engine, set())
    assert caps.continues == expected
    assert caps.continuous_usage == (engine in {"local", "vllm", "vllm-tpu", "vllm-neuron", "sglang"})
    assert caps.tools and caps.n and not caps.betas
    assert caps.logprobs == (engine != "local")
    # the pool's word wins: false continues nothing, true continues text (continue_final_message)
    assert adapter.capabilities(endpoint(engine, can_continue=False)).continues == frozenset()
    if engine != "local":
        assert adapter.capabilities(endpoint(engine, can_continue=True)).continues == {"text"}


# -- build: an OpenAI client's bytes pass through ----------------------------------------------------------


def test_pass_through_sends_the_clients_very_bytes_and_lowers_nothing() -> None:
    request = client_request(chat(stream=True, tools=[{"type": "function", "function": {"name": "f"}}]))
    for engine in ("tgi", "openai", "llama-cpp"):
        call = OpenAIBackend(engine).build(request, endpoint(engine))
        assert call.body is request.raw and call.path == b"/chat/completions"
    call = OpenAIBackend("vllm").build(request, endpoint("vllm"))  # no token count needed: untouched too
    assert call.body is request.raw
    assert call.headers == [(b"content-type", b"application/json"), (b"accept", b"text/event-stream")]
    assert request.pending is not None and request.messages == [] and request.tools == []


def test_stream_options_are_spliced_in_front_of_the_clients_bytes() -> None:
    request = client_request(chat(stream=True, max_tokens=20))
    body = OpenAIBackend("vllm").build(request, endpoint("vllm")).body
    assert (
        body == b'{"stream_options":{"include_usage":true,"continuous_usage_stats":true},' + request.raw[1:]
    )
    assert orjson.loads(body) == {
        **request.body,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    assert request.pending is not None


@pytest.mark.parametrize(
    ("fields", "usage", "expected"),
    [
        ({}, False, None),  # nothing to count: the client's options
        ({}, True, {"include_usage": True}),  # telemetry wants the total only
        (
            {"stream_options": {"include_usage": True}},
            True,
            {"include_usage": True, "continuous_usage_stats": True},
        ),
        ({"max_completion_tokens": 5}, False, {"include_usage": True, "continuous_usage_stats": True}),
        ({"min_tokens": 2}, False, {"include_usage": True, "continuous_usage_stats": True}),
        ({"stream_options": {"include_usage": True, "continuous_usage_stats": True}}, False, "client"),
        (
            {"stream_options": {"include_usage": False, "x": 1}, "max_tokens": 3},
            False,
            {"include_usage": True, "continuous_usage_stats": True, "x": 1},
        ),
    ],
)
def test_stream_options_as_today(fields: dict[str, Any], usage: bool, expected: Any) -> None:
    request = client_request(chat(stream=True, **fields))
    body = orjson.loads(OpenAIBackend("sglang").build(request, endpoint("sglang"), usage=usage).body)
    if expected is None:
        assert "stream_options" not in body
    elif expected == "client":
        assert body["stream_options"] == request.body["stream_options"]
    else:
        assert body["stream_options"] == expected
    # engines that cannot give running usage get the client's options untouched
    assert OpenAIBackend("tgi").build(request, endpoint("tgi"), usage=usage).body is request.raw


def test_a_renamed_model_re_encodes_and_auth_is_added() -> None:
    request = client_request(chat(stream=False, max_tokens=9), b"/v1/chat/completions")
    call = OpenAIBackend("openai").build(request, endpoint("openai", upstream="gpt-x", api_key="sk-up"))
    assert orjson.loads(call.body) == {**request.body, "model": "gpt-x"}
    assert call.headers == [
        (b"content-type", b"application/json"),
        (b"accept", b"application/json"),
        (b"authorization", b"Bearer sk-up"),
    ]
    completions = client_request({"model": "m", "prompt": "x", "stream": True}, b"/v1/completions")
    call = OpenAIBackend("vllm").build(completions, endpoint("vllm", upstream="big"), usage=True)
    assert call.path == b"/completions"
    assert orjson.loads(call.body) == {
        "model": "big",
        "prompt": "x",
        "stream": True,
        "stream_options": {"include_usage": True},
    }


# -- build: a client of another protocol is translated -----------------------------------------------------


def anthropic_request(**fields: Any) -> CanonicalRequest:
    defaults: dict[str, Any] = dict(
        protocol="anthropic.messages",
        model="claude-ish",
        max_tokens=100,
        stream=True,
        system=[{"type": "text", "text": "be kind", "cache_control": {"type": "ephemeral"}}],
        messages=[
            Message("user", [{"type": "text", "text": "weather?"}]),
            Message(
                "assistant",
                [
                    {"type": "thinking", "thinking": "call the tool", "signature": "s"},
                    {"type": "text", "text": "let me check"},
                    {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "raw", "input": {"_raw": "{broken"}},
                ],
            ),
            Message(
                "user",
                [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "cold"}],
                    },
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "n/a"},
                    {"type": "text", "text": "and tomorrow?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "QQ=="},
                    },
                ],
            ),
        ],
        tools=[
            Tool(
                "weather",
                "forecast",
                {"type": "object", "properties": {"city": {"type": "string"}}},
                {"cache_control": {}},
            )
        ],
        tool_choice=ToolChoice("any", disable_parallel=True),
        stop=["\n\nHuman:"],
        temperature=0.3,
        top_k=20,
        metadata={"user_id": "u1"},
        extras={"context_management": {"edits": []}},
        betas=["interleaved-thinking-2025-05-14"],
        thinking=Thinking(budget_tokens=4000),
    )
    defaults.update(fields)
    return CanonicalRequest(**defaults)


def test_translated_body_for_vllm() -> None:
    call = OpenAIBackend("vllm").build(anthropic_request(), endpoint("vllm", upstream="qwen"))
    assert call.path == b"/chat/completions"
    body = orjson.loads(call.body)
    assert body == {
        "model": "qwen",
        "messages": [
            {"role": "system", "content": "be kind"},
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": "let me check",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
                    },
                    {
                        "id": "toolu_2",
                        "type": "function",
                        "function": {"name": "raw", "arguments": "{broken"},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "cold"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "n/a"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "and tomorrow?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,QQ=="}},
                ],
            },
        ],
        "max_tokens": 100,
        "temperature": 0.3,
        "top_k": 20,
        "stop": ["\n\nHuman:"],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                    "description": "forecast",
                },
            }
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "chat_template_kwargs": {"enable_thinking": True},
        "user": "u1",
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }


def test_translated_body_for_openai_and_tgi() -> None:
    body = orjson.loads(
        OpenAIBackend("openai").build(anthropic_request(), endpoint("openai", upstream="o4")).body
    )
    assert body["max_completion_tokens"] == 100 and "max_tokens" not in body
    assert body["reasoning_effort"] == "medium"  # a 4,000-token budget
    assert "top_k" not in body and "chat_template_kwargs" not in body
    assert body["stream_options"] == {"include_usage": True}
    tgi = orjson.loads(
        OpenAIBackend("tgi")
        .build(anthropic_request(stream=False, thinking=Thinking(effort="low")), endpoint("tgi"))
        .body
    )
    assert "reasoning_effort" not in tgi and "chat_template_kwargs" not in tgi and "stream_options" not in tgi
    assert tgi["stream"] is False
    named = orjson.loads(
        OpenAIBackend("vllm")
        .build(anthropic_request(tool_choice=ToolChoice("tool", "weather")), endpoint("vllm"))
        .body
    )
    assert named["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert "parallel_tool_calls" not in named


def test_an_openai_clients_lowered_request_survives_the_round_trip() -> None:
    """OpenAI → canonical → OpenAI: what the lowering keeps comes back as the client sent it."""
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "r"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "auto",
        "max_tokens": 7,
    }
    request = client_request(body).lower()
    request.protocol = (
        "anthropic.messages"  # as if it came in another protocol: translated, not passed through
    )
    out = orjson.loads(OpenAIBackend("vllm").build(request, endpoint("vllm")).body)
    assert out["messages"] == body["messages"]
    assert out["tools"] == body["tools"] and out["tool_choice"] == "auto" and out["max_tokens"] == 7


# -- continuation ------------------------------------------------------------------------------------------


def progress(*parts: Part) -> Progress:
    return Progress(id="x", parts=list(parts))


def continued(call: Any) -> dict[str, Any]:
    assert call is not None
    return orjson.loads(call.body)


def test_chat_text_continues_in_place_on_vllm() -> None:
    request = client_request(chat(stream=True, max_tokens=20, min_tokens=5, temperature=0))
    body = continued(
        OpenAIBackend("vllm").continuation(
            request, endpoint("vllm", upstream="up"), progress(Part("text", "Hello wor")), 8
        )
    )
    assert body["model"] == "up"
    assert body["messages"][-1] == {"role": "assistant", "content": "Hello wor"}
    assert body["messages"][:-1] == request.body["messages"]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert (body["max_tokens"], body["min_tokens"]) == (12, 0)
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert request.pending is not None  # the OpenAI client's body is reused, nothing lowered


def test_reasoning_and_a_cut_tool_call_continue_on_the_replica_only() -> None:
    request = client_request(chat(stream=True, max_completion_tokens=100))
    sent = progress(
        Part("reasoning", "I should call f"),
        Part("text", "Calling."),
        Part("tool", '{"city": "Os', id="call_1", name="weather"),
    )
    body = continued(OpenAIBackend("local").continuation(request, endpoint("local"), sent, 30))
    assert body["messages"][-1] == {
        "role": "assistant",
        "content": "Calling.",
        "reasoning_content": "I should call f",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Os'}}
        ],
    }
    assert body["max_completion_tokens"] == 70
    assert OpenAIBackend("vllm").continuation(request, endpoint("vllm"), sent, 30) is None  # vLLM: text only
    # parts in an order one assistant message cannot hold
    odd = progress(Part("tool", "{}", id="c", name="f"), Part("text", "after"))
    assert OpenAIBackend("local").continuation(request, endpoint("local"), odd, 3) is None
    assert (
        OpenAIBackend("local").continuation(
            request, endpoint("local"), progress(Part("redacted", data="x")), 3
        )
        is None
    )


def test_continuation_limits_and_refusals() -> None:
    request = client_request(chat(stream=True, max_tokens=10))
    text = progress(Part("text", "abc"))
    assert OpenAIBackend("vllm").continuation(request, endpoint("vllm"), text, 10) is None  # nothing left
    with pytest.raises(ValueError, match="exact count"):
        OpenAIBackend("vllm").continuation(request, endpoint("vllm"), text, None)
    assert OpenAIBackend("vllm").continuation(request, endpoint("vllm", can_continue=False), text, 3) is None
    assert OpenAIBackend("tgi").continuation(request, endpoint("tgi"), text, 3) is None
    assert (
        continued(OpenAIBackend("tgi").continuation(request, endpoint("tgi", can_continue=True), text, 3))[
            "messages"
        ][-1]["content"]
        == "abc"
    )
    # nothing sent yet: the request again, on any engine, without a prefill
    fresh = continued(
        OpenAIBackend("tgi").continuation(request, endpoint("tgi", can_continue=False), progress(), 0)
    )
    assert fresh["messages"] == request.body["messages"] and "continue_final_message" not in fresh
    unlimited = client_request(chat(stream=True))
    assert (
        continued(OpenAIBackend("vllm").continuation(unlimited, endpoint("vllm"), text, None))["messages"][
            -1
        ]["content"]
        == "abc"
    )


def test_completions_continue_from_the_prompt() -> None:
    request = client_request(
        {"model": "m", "prompt": "Once", "stream": True, "max_tokens": 16}, b"/v1/completions"
    )
    call = OpenAIBackend("sglang").continuation(
        request, endpoint("sglang"), progress(Part("text", " upon a")), 3
    )
    assert call is not None and call.path == b"/completions"
    body = orjson.loads(call.body)
    assert (body["prompt"], body["max_tokens"]) == ("Once upon a", 13)
    assert "messages" not in body and "continue_final_message" not in body
    tokens = client_request({"model": "m", "prompt": [1, 2], "stream": True}, b"/v1/completions")
    assert (
        OpenAIBackend("vllm").continuation(tokens, endpoint("vllm"), progress(Part("text", "x")), 1) is None
    )


def test_a_translated_request_continues_on_its_translated_body() -> None:
    request = anthropic_request(thinking=None)
    body = continued(
        OpenAIBackend("vllm").continuation(request, endpoint("vllm"), progress(Part("text", "It is")), 4)
    )
    assert body["messages"][-1] == {"role": "assistant", "content": "It is"}
    assert body["messages"][0] == {"role": "system", "content": "be kind"}
    assert body["max_tokens"] == 96 and body["continue_final_message"] is True
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


# -- the stream decoder ------------------------------------------------------------------------------------


def sse(*objects: Any) -> bytes:
    return b"".join(b"data: " + (o if isinstance(o, bytes) else orjson.dumps(o)) + b"\n\n" for o in objects)


def vllm_chunk(
    delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
    choice.update(extra.pop("choice", {}))
    return {
        "id": "chatcmpl-v",
        "object": "chat.completion.chunk",
        "created": 1700,
        "model": "qwen",
        "choices": [choice],
        **extra,
    }


VLLM_STREAM = b": keep-alive\n\n" + sse(
    vllm_chunk({"role": "assistant", "content": ""}),
    vllm_chunk(
        {"reasoning_content": "Let me think. "},
        usage={"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16},
    ),
    vllm_chunk({"content": "t0 t1 t2 "}),
    vllm_chunk({"content": "caf\u00e9 \u2014 \U0001f600 "}),
    vllm_chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "chatcmpl-tool-1",
                    "type": "function",
                    "function": {"name": "get", "arguments": ""},
                }
            ]
        }
    ),
    vllm_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"q": "a\\nb"}'}}]}),
    vllm_chunk({}, "tool_calls"),
    {
        "id": "chatcmpl-v",
        "object": "chat.completion.chunk",
        "created": 1700,
        "model": "qwen",
        "choices": [],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 20,
            "total_tokens": 32,
            "prompt_tokens_details": {"cached_tokens": 8},
        },
    },
    b"[DONE]",
)

EXPECTED: list[Event] = [
    Start("chatcmpl-v", "qwen", 1700),
    ReasoningDelta("Let me think. "),
    Usage(12, 4, 0),
    TextDelta("t0 t1 t2 "),
    TextDelta("caf\u00e9 \u2014 \U0001f600 "),
    ToolCallDelta(0, "", "chatcmpl-tool-1", "get"),
    ToolCallDelta(0, '{"q": "a\\nb"}'),
    Finish("tool_calls", native="tool_calls"),
    Usage(12, 20, 8),
    End(),
]


def decode_all(pieces: list[bytes]) -> tuple[bytes, list[Event]]:
    decoder = OpenAIBackend("vllm").decoder()
    raw, events = b"", []
    for piece in pieces:
        for event_raw, decoded in decoder.feed(piece):
            raw += event_raw
            events.extend(decoded)
    assert decoder.pending == b""
    return raw, events


def test_decoder_on_a_whole_stream() -> None:
    raw, events = decode_all([VLLM_STREAM])
    assert events == EXPECTED
    assert raw == VLLM_STREAM.removeprefix(b": keep-alive\n\n")  # raw events verbatim, comments left out


def test_decoder_on_every_split_of_the_bytes() -> None:
    """Cut anywhere — inside a UTF-8 character, inside ``\\n\\n``, inside ``data:`` — the same events."""
    for cut in range(1, len(VLLM_STREAM)):
        assert decode_all([VLLM_STREAM[:cut], VLLM_STREAM[cut:]])[1] == EXPECTED, cut
    pieces = [VLLM_STREAM[i : i + 7] for i in range(0, len(VLLM_STREAM), 7)]
    assert decode_all(pieces)[1] == EXPECTED
    assert decode_all([bytes([b]) for b in VLLM_STREAM])[1] == EXPECTED


def test_decoder_takes_crlf_and_multi_line_data() -> None:
    crlf = VLLM_STREAM.replace(b"\n", b"\r\n")
    assert decode_all([crlf[:101], crlf[101:]])[1] == EXPECTED
    multi = b'data: {"id":"a","choices":[{"index":0,\ndata: "delta":{"content":"x"}}]}\n\n'
    assert decode_all([multi])[1] == [Start("a", "", None), TextDelta("x")]
    nospace = (
        b'event: message\ndata:{"id":"a","choices":[{"index":0,"text":"y","finish_reason":"length"}]}\n\n'
    )
    assert decode_all([nospace])[1] == [
        Start("a", "", None),
        TextDelta("y"),
        Finish("length", native="length"),
    ]


def test_decoder_maps_what_engines_send() -> None:
    stream = sse(
        vllm_chunk({"reasoning": "newer vllm"}),
        vllm_chunk({"content": "x"}, "stop", choice={"stop_reason": "END"}),
        vllm_chunk({}, "stop", choice={"index": 1, "stop_reason": 128009}),
        vllm_chunk({"function_call": {"name": "legacy", "arguments": "{}"}}, "function_call"),
        vllm_chunk({"refusal": "I can't"}, "content_filter"),
        vllm_chunk({"content": "y"}, choice={"logprobs": {"content": [{"token": "y", "logprob": -1.0}]}}),
        {"error": {"message": "engine died", "type": "internal_server_error", "code": 500}},
        {"error": "bare string"},
    )
    events = decode_all([stream])[1]
    assert events == [
        Start("chatcmpl-v", "qwen", 1700),
        ReasoningDelta("newer vllm"),
        TextDelta("x"),
        Finish("stop_sequence", stop_sequence="END", native="stop"),
        Finish("end", 1, native="stop"),
        ToolCallDelta(0, "{}", None, "legacy"),
        Finish("tool_calls", native="function_call"),
        TextDelta("I can't"),
        Finish("content_filter", native="content_filter"),
        Logprobs({"content": [{"token": "y", "logprob": -1.0}]}),
        TextDelta("y"),
        StreamError("engine died", "internal_server_error"),
        StreamError("bare string"),
    ]


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        b"[1]",
        b'{"choices": {"index": 0}}',
        b'{"choices": [3]}',
        b'{"choices": [{"index": "0", "delta": {}}]}',
        b'{"choices": [{"index": 0, "delta": {"content": 5}}]}',
        b'{"choices": [{"index": 0, "delta": "x"}]}',
        b'{"choices": [{"index": 0, "text": ["x"]}]}',
        b'{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": 1}}]}}]}',
        b'{"choices": [{"index": 0, "delta": {"tool_calls": {"index": 0}}}]}',
        b'{"choices": [], "usage": 7}',
    ],
)
def test_malformed_events_raise(payload: bytes) -> None:
    with pytest.raises(MalformedEvent):
        OpenAIBackend("vllm").decoder().feed(b"data: " + payload + b"\n\n")


# -- whole responses ---------------------------------------------------------------------------------------


def test_decode_response_chat_and_completions() -> None:
    body = {
        "id": "chatcmpl-r",
        "object": "chat.completion",
        "created": 5,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "reasoning_content": "why",
                    "tool_calls": [
                        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}},
                        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }
    events = OpenAIBackend("openai").decode_response(orjson.dumps(body))
    assert events == [
        Start("chatcmpl-r", "m", 5),
        ReasoningDelta("why"),
        ToolCallDelta(0, '{"x":1}', "a", "f"),
        ToolCallDelta(1, "{}", "b", "g"),
        Finish("tool_calls", native="tool_calls"),
        Usage(3, 4, 0),
    ]
    # and back: the frontend's response holds the same calls
    again = orjson.loads(FRONT.response(CanonicalRequest(protocol="openai.chat", model="m"), events))
    assert again["choices"][0]["message"]["tool_calls"] == body["choices"][0]["message"]["tool_calls"]
    completion = {
        "id": "c",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": "length"}],
    }
    assert OpenAIBackend("vllm").decode_response(orjson.dumps(completion)) == [
        Start("c", "m", 1),
        TextDelta("hi"),
        Finish("length", native="length"),
    ]
    assert OpenAIBackend("vllm").decode_response(b'{"error": {"message": "no"}}') == [StreamError("no")]
    with pytest.raises(MalformedEvent):
        OpenAIBackend("vllm").decode_response(b"<html>")


def test_stream_round_trip_through_the_encoder() -> None:
    """vLLM bytes → events → the OpenAI encoder → events again: the same answer."""
    _, events = decode_all([VLLM_STREAM])
    request = client_request(chat(stream=True, stream_options={"include_usage": True}))
    encoder = FRONT.encoder(request)
    out = b"".join(encoder.encode(e) for e in events) + encoder.end()
    again = decode_all([out])[1]
    assert [e for e in again if not isinstance(e, Usage)] == [e for e in EXPECTED if not isinstance(e, Usage)]
    assert [e for e in again if isinstance(e, Usage)] == [Usage(12, 20, 8)]  # the final usage, once


# -- classification ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "body", "verdict", "retry_after"),
    [
        (200, [], b"", "ok", None),
        (429, [(b"retry-after", b"7")], b"", "throttled", 7.0),
        (429, [(b"Retry-After-Ms", b"1500")], b"", "throttled", 1.5),
        (429, [], b"", "throttled", None),
        (503, [(b"retry-after", b"2")], b"", "overloaded", 2.0),
        (500, [], b"", "retryable", None),
        (502, [], b"", "retryable", None),
        (504, [], b"", "retryable", None),
        (401, [], b"", "retryable", None),
        (403, [], b"", "retryable", None),
        (400, [], b'{"error":{"code":"context_length_exceeded"}}', "context_length", None),
        (
            400,
            [],
            b"This model's maximum context length is 4096 tokens. However, you requested 5000",
            "context_length",
            None,
        ),
        (
            400,
            [],
            b"The input (5000 tokens) is longer than the model's context length (4096 tokens).",
            "context_length",
            None,
        ),
        (400, [], b'{"error":{"type":"exceed_context_size_error"}}', "context_length", None),
        (
            422,
            [],
            b"Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096",
            "context_length",
            None,
        ),
        (400, [], b'{"error":{"message":"temperature must be <= 2"}}', "client", None),
        (404, [], b"model not found", "client", None),
        (422, [], b"bad field", "client", None),
    ],
)
def test_classification(
    status: int, headers: list[tuple[bytes, bytes]], body: bytes, verdict: str, retry_after: float | None
) -> None:
    outcome = OpenAIBackend("vllm").classify(status, headers, body)
    assert (outcome.verdict, outcome.retry_after) == (verdict, retry_after)


def test_retry_after_as_an_http_date() -> None:
    outcome = OpenAIBackend("openai").classify(429, [(b"retry-after", b"Wed, 21 Oct 2015 07:28:00 GMT")], b"")
    assert outcome.verdict == "throttled" and outcome.retry_after == 0.0  # in the past: no wait
