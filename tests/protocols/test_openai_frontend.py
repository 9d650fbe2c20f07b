"""OpenAI's client protocol on the seam: parsing (validation, lazy lowering), encoding, responses, errors.

Encoded chunks and responses are checked twice: by the official SDK's types, and against the fields
OpenAI's published OpenAPI description (openai/openai-openapi) marks required, with ``system_fingerprint``
a string wherever it appears (the description types it ``string``, never null).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from skyfabric.core.errors import InvalidRequest
from skyfabric.protocols.canonical import (
    CanonicalRequest,
    End,
    Event,
    Finish,
    Logprobs,
    Message,
    ReasoningDelta,
    ReasoningSignature,
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

CHAT = b"/v1/chat/completions"
COMPLETIONS = b"/v1/completions"
FRONT = OpenAIFrontend()


def parse(body: dict[str, Any] | bytes, path: bytes = CHAT) -> CanonicalRequest:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return FRONT.parse(path, raw, [])


def sse_objects(data: bytes) -> list[Any]:
    """The JSON objects of an SSE byte stream, ``"[DONE]"`` for the end; every event framed exactly."""
    assert data.endswith(b"\n\n")
    out: list[Any] = []
    for event in data[:-2].split(b"\n\n"):
        assert event.startswith(b"data: ") and b"\n" not in event, event
        payload = event[6:]
        out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


# -- what OpenAI's OpenAPI description requires ----------------------------------------------------

USAGE_REQUIRED = {"prompt_tokens", "completion_tokens", "total_tokens"}


def check_fingerprint(obj: dict[str, Any]) -> None:
    assert isinstance(obj["system_fingerprint"], str) and obj["system_fingerprint"]


def check_chunk_spec(obj: dict[str, Any], chat: bool = True) -> None:
    assert {"choices", "created", "id", "model", "object"} <= set(obj)
    assert obj["object"] == ("chat.completion.chunk" if chat else "text_completion")
    check_fingerprint(obj)
    for choice in obj["choices"]:
        required = (
            {"delta", "finish_reason", "index"} if chat else {"finish_reason", "index", "logprobs", "text"}
        )
        assert required <= set(choice)
    if "usage" in obj:
        assert set(obj["usage"]) >= USAGE_REQUIRED


def check_response_spec(obj: dict[str, Any], chat: bool = True) -> None:
    assert {"choices", "created", "id", "model", "object"} <= set(obj)
    check_fingerprint(obj)
    for choice in obj["choices"]:
        if chat:
            assert {"finish_reason", "index", "message", "logprobs"} <= set(choice)
            assert {"role", "content", "refusal"} <= set(choice["message"])
            for call in choice["message"].get("tool_calls", []):
                assert {"id", "type", "function"} <= set(call)
                assert {"name", "arguments"} <= set(call["function"])
        else:
            assert {"finish_reason", "index", "logprobs", "text"} <= set(choice)
    if "usage" in obj:
        assert set(obj["usage"]) >= USAGE_REQUIRED


# -- parsing: today's validation, word for word -----------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "needle", "param"),
    [
        (CHAT, b"{not json", "the request body is not valid JSON: ", None),
        (CHAT, b"[1, 2]", "the request body must be a JSON object", None),
        (
            CHAT,
            b'{"messages": [{"role": "user", "content": "x"}]}',
            "you must provide a model parameter",
            "model",
        ),
        (CHAT, b'{"model": "", "messages": []}', "you must provide a model parameter", "model"),
        (CHAT, b'{"model": "m"}', "`messages` must be a non-empty array of messages", "messages"),
        (
            CHAT,
            b'{"model": "m", "messages": [], "stream": "yes"}',
            "`messages` must be a non-empty array",
            "messages",
        ),
        (
            CHAT,
            b'{"model": "m", "messages": [{"role": "user"}, 3]}',
            "messages[1] must be an object with a `role`",
            "messages.1",
        ),
        (
            CHAT,
            b'{"model": "m", "messages": [{"content": "x"}]}',
            "messages[0] must be an object with a `role`",
            "messages.0",
        ),
        (
            CHAT,
            b'{"model": "m", "messages": [{"role": "user"}], "stream": "yes"}',
            "`stream` must be a boolean",
            "stream",
        ),
        (COMPLETIONS, b'{"model": "m"}', "`prompt` must be a string or an array", "prompt"),
        (COMPLETIONS, b'{"model": "m", "prompt": 5}', "`prompt` must be a string or an array", "prompt"),
        (COMPLETIONS, b'{"model": "m", "prompt": "x", "stream": 1}', "`stream` must be a boolean", "stream"),
    ],
)
def test_bad_requests_are_refused_with_todays_messages(
    path: bytes, body: bytes, needle: str, param: str | None
) -> None:
    with pytest.raises(InvalidRequest) as info:
        FRONT.parse(path, body, [])
    assert needle in info.value.message
    assert info.value.param == param
    assert info.value.status == 400


def test_stream_null_is_false_and_paths_set_the_protocol() -> None:
    chat = parse({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": None})
    assert (chat.protocol, chat.stream) == ("openai.chat", False)
    completion = parse({"model": "m", "prompt": "x", "stream": True}, COMPLETIONS)
    assert (completion.protocol, completion.stream, completion.prompt) == ("openai.completions", True, "x")
    with pytest.raises(InvalidRequest):
        FRONT.parse(b"/v1/embeddings", b"{}", [])


def test_scalars_are_read_eagerly() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 50,
        "temperature": 0.5,
        "top_p": 1,
        "top_k": 40,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 3,
        "stop": "END",
        "seed": 7,
    }
    raw = orjson.dumps(body)
    request = FRONT.parse(CHAT, raw, [])
    assert request.model == "m" and request.stream and request.include_usage
    assert (request.max_tokens, request.temperature, request.top_p, request.top_k) == (50, 0.5, 1, 40)
    assert (request.n, request.logprobs, request.top_logprobs, request.stop, request.seed) == (
        2,
        True,
        3,
        ["END"],
        7,
    )
    assert request.body == body and request.raw is raw
    # max_tokens wins over max_completion_tokens (as the relay's token limit read them); wrong types are left
    other = parse(
        {
            "model": "m",
            "messages": [{"role": "user"}],
            "max_tokens": 9,
            "max_completion_tokens": 50,
            "temperature": "hot",
            "n": 0,
            "stop": ["a", 1, "b"],
            "stream_options": {"include_usage": False},
        }
    )
    assert (other.max_tokens, other.temperature, other.n, other.stop, other.include_usage) == (
        9,
        None,
        1,
        ["a", "b"],
        False,
    )
    flag = parse({"model": "m", "messages": [{"role": "user"}], "max_tokens": True})
    assert flag.max_tokens is None
    completion = parse({"model": "m", "prompt": ["a", "b"], "logprobs": 2}, COMPLETIONS)
    assert (completion.logprobs, completion.top_logprobs, completion.prompt) == (True, 2, ["a", "b"])


def test_the_field_order_that_parse_relies_on() -> None:
    """``parse`` builds the request positionally (twice as fast): a reordered dataclass must fail here."""
    assert [f.name for f in dataclasses.fields(CanonicalRequest)] == [
        "protocol", "model", "messages", "system", "prompt", "max_tokens", "temperature", "top_p", "top_k",
        "stop", "seed", "n", "tools", "tool_choice", "thinking", "stream", "include_usage", "logprobs",
        "top_logprobs", "metadata", "extras", "betas", "version", "body", "raw", "pending",
    ]  # fmt: skip


def test_parsing_leaves_messages_to_be_lowered_later() -> None:
    request = parse(
        {
            "model": "m",
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        }
    )
    assert request.pending is not None
    assert request.messages == [] and request.system == [] and request.tools == [] and request.extras == {}
    assert request.lower() is request
    assert request.pending is None
    assert request.system == [{"type": "text", "text": "be brief"}]
    assert request.messages == [Message("user", [{"type": "text", "text": "hi"}])]
    request.lower()  # once only
    assert len(request.messages) == 1


# -- lowering ------------------------------------------------------------------------------------------------


def test_lowering_a_conversation_with_tools_images_and_reasoning() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "sys one"},
            {"role": "developer", "content": [{"type": "text", "text": "dev two"}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/jpeg;base64,QUJD", "detail": "low"},
                    },
                    {"type": "image_url", "image_url": {"url": "https://x.test/cat.png"}},
                    {"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}},
                    {"type": "text", "text": ""},
                ],
            },
            {
                "role": "assistant",
                "reasoning_content": "think first",
                "content": "calling",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get", "arguments": '{"q": 1}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "bad", "arguments": "{not json"},
                    },
                    {"id": "call_3", "type": "function", "function": {"name": "none", "arguments": ""}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "result one"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "result two"}]},
            {"role": "system", "content": "mid-conversation rule"},
            {"role": "assistant", "content": None, "tool_calls": []},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get",
                    "description": "fetch",
                    "parameters": {"type": "object"},
                    "strict": True,
                },
            },
            {"type": "function", "function": {"name": "bare"}},
            {"type": "custom", "custom": {"name": "grammar"}},
        ],
        "tool_choice": {"type": "function", "function": {"name": "get"}},
        "parallel_tool_calls": False,
        "reasoning_effort": "high",
        "user": "u-42",
        "frequency_penalty": 0.2,
        "response_format": {"type": "json_object"},
    }
    request = parse(body).lower()
    assert request.system == [{"type": "text", "text": "sys one"}, {"type": "text", "text": "dev two"}]
    user, assistant, tool1, tool2, system, empty = request.messages
    assert user == Message(
        "user",
        [
            {"type": "text", "text": "look"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "QUJD"}},
            {"type": "image", "source": {"type": "url", "url": "https://x.test/cat.png"}},
            {"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}},
        ],
    )
    assert assistant.content == [
        {"type": "thinking", "thinking": "think first"},
        {"type": "text", "text": "calling"},
        {"type": "tool_use", "id": "call_1", "name": "get", "input": {"q": 1}},
        {"type": "tool_use", "id": "call_2", "name": "bad", "input": {"_raw": "{not json"}},
        {"type": "tool_use", "id": "call_3", "name": "none", "input": {}},
    ]
    assert tool1 == Message(
        "tool",
        [
            {
                "type": "tool_result",
                "tool_use_id": "call_1",
                "content": [{"type": "text", "text": "result one"}],
            }
        ],
    )
    assert tool2.content[0]["content"] == [{"type": "text", "text": "result two"}]
    assert system == Message("system", [{"type": "text", "text": "mid-conversation rule"}])
    assert empty == Message("assistant", [])
    assert request.tools == [
        Tool("get", "fetch", {"type": "object"}, {"strict": True}),
        Tool("bare", None, {"type": "object", "properties": {}}, {}),
    ]
    assert request.tool_choice == ToolChoice("tool", "get", disable_parallel=True)
    assert request.thinking == Thinking(enabled=True, effort="high")
    assert request.metadata == {"user_id": "u-42"}
    assert request.extras == {
        "frequency_penalty": 0.2,
        "response_format": {"type": "json_object"},
        "tools": [{"type": "custom", "custom": {"name": "grammar"}}],
    }


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("none", None, ToolChoice("none")),
        ("auto", None, ToolChoice("auto")),
        ("required", None, ToolChoice("any")),
        (None, False, ToolChoice("auto", disable_parallel=True)),
        ("required", False, ToolChoice("any", disable_parallel=True)),
        (None, True, None),
    ],
)
def test_tool_choice_mapping(choice: str | None, parallel: bool | None, expected: ToolChoice | None) -> None:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert parse(body).lower().tool_choice == expected


def test_reasoning_effort_none_turns_thinking_off_and_completions_lower_extras_only() -> None:
    request = parse(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "none"}
    )
    assert request.lower().thinking == Thinking(enabled=False, effort="none")
    completion = parse({"model": "m", "prompt": "x", "echo": True, "user": "me"}, COMPLETIONS).lower()
    assert completion.extras == {"echo": True} and completion.metadata == {"user_id": "me"}
    assert completion.messages == []


# -- encoding a stream ---------------------------------------------------------------------------------------


def chat_request(**fields: Any) -> CanonicalRequest:
    return CanonicalRequest(protocol="openai.chat", model="client-model", stream=True, **fields)


def encode(request: CanonicalRequest, events: list[Event]) -> bytes:
    encoder = FRONT.encoder(request)
    return b"".join(encoder.encode(e) for e in events) + encoder.end()


def test_chat_stream_is_valid_openai_chunks() -> None:
    events: list[Event] = [
        Start("chatcmpl-1", "backend-model", 1700000000),
        ReasoningDelta("hmm"),
        ReasoningSignature("sig"),
        TextDelta("Hel"),
        TextDelta("lo"),
        ToolCallDelta(0, "", id="call_a", name="get"),
        ToolCallDelta(0, '{"q":'),
        ToolCallDelta(0, " 1}"),
        ToolCallDelta(1, "{}", id="call_b", name="put"),
        Finish("tool_calls", native="tool_calls"),
        Usage(10, 7, cached_input_tokens=4),
        End(),
    ]
    objects = sse_objects(encode(chat_request(include_usage=True), events))
    assert objects[-1] == "[DONE]"
    chunks = objects[:-1]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
        check_chunk_spec(chunk)
        assert (chunk["id"], chunk["created"], chunk["model"]) == ("chatcmpl-1", 1700000000, "backend-model")
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert deltas[1] == {"reasoning_content": "hmm"}
    assert [d.get("content") for d in deltas[2:4]] == ["Hel", "lo"]
    assert deltas[4] == {
        "tool_calls": [
            {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get", "arguments": ""}}
        ]
    }
    assert deltas[5] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"q":'}}]}
    assert deltas[7]["tool_calls"][0]["id"] == "call_b"
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 7,
        "total_tokens": 17,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    # the SDK's own accumulation reads the tool call back whole
    calls: dict[int, str] = {}
    for chunk in chunks:
        for choice in ChatCompletionChunk.model_validate(chunk).choices:
            for call in choice.delta.tool_calls or []:
                calls[call.index] = calls.get(call.index, "") + (
                    call.function.arguments or "" if call.function else ""
                )
    assert calls == {0: '{"q": 1}', 1: "{}"}


def test_chunks_are_framed_as_the_gateway_frames_them() -> None:
    out = encode(chat_request(), [Start("c", "m", 5), TextDelta("a\n\nb"), Finish("end", native="stop")])
    head = b'data: {"id":"c","object":"chat.completion.chunk","created":5,"model":"m","system_fingerprint":'
    head += b'"fp_skyfabric","choices":['
    assert out == (
        head
        + b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
        + head
        + b'{"index":0,"delta":{"content":"a\\n\\nb"},"logprobs":null,"finish_reason":null}]}\n\n'
        + head
        + b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}\n\n'
        + b"data: [DONE]\n\n"
    )


@pytest.mark.parametrize(
    ("reason", "native", "expected"),
    [
        ("end", None, "stop"),
        ("end", "stop", "stop"),
        ("stop_sequence", None, "stop"),
        ("length", None, "length"),
        ("length", "max_tokens", "length"),
        ("tool_calls", "tool_use", "tool_calls"),
        ("tool_calls", "function_call", "function_call"),
        ("content_filter", None, "content_filter"),
        ("refusal", "refusal", "content_filter"),
        ("pause", "pause_turn", "stop"),
        ("end", "end_turn", "stop"),
    ],
)
def test_finish_reasons_map_back(reason: str, native: str | None, expected: str) -> None:
    chunks = sse_objects(encode(chat_request(), [Start("c", "m", 1), Finish(reason, native=native)]))
    assert chunks[-2]["choices"][0]["finish_reason"] == expected


def test_usage_is_sent_only_when_asked_for() -> None:
    events: list[Event] = [Start("c", "m", 1), TextDelta("x"), Usage(3, 1), Finish("end"), Usage(3, 2)]
    without = sse_objects(encode(chat_request(), events))
    assert all("usage" not in c for c in without[:-1])
    with_usage = sse_objects(encode(chat_request(include_usage=True), events))
    assert with_usage[-2]["usage"]["completion_tokens"] == 2  # the last usage the backend reported
    assert sum("usage" in c for c in with_usage[:-1]) == 1


def test_a_continued_stream_keeps_its_id_and_reports_usage_as_given() -> None:
    events: list[Event] = [
        Start("first", "m1", 100),
        TextDelta("one two "),
        Usage(20, 5),
        Start("second", "m2", 200),  # the continuation's backend
        TextDelta("three"),
        Usage(20, 8, cached_input_tokens=20),  # the relay sums usage over the backends, not the encoder
        Finish("end", native="stop"),
    ]
    chunks = sse_objects(encode(chat_request(include_usage=True), events))[:-1]
    assert {(c["id"], c["created"], c["model"]) for c in chunks} == {("first", 100, "m1")}
    roles = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")]
    assert len(roles) == 1  # no second role chunk
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 20,
        "completion_tokens": 8,
        "total_tokens": 28,
        "prompt_tokens_details": {"cached_tokens": 20},
    }


def test_logprobs_ride_with_their_text() -> None:
    lp = {"content": [{"token": "x", "logprob": -0.1, "bytes": [120], "top_logprobs": []}], "refusal": None}
    chunks = sse_objects(
        encode(
            chat_request(), [Start("c", "m", 1), Logprobs(lp), TextDelta("x"), Logprobs(lp), Finish("end")]
        )
    )
    for chunk in chunks[:-1]:
        ChatCompletionChunk.model_validate(chunk)
    text = chunks[1]["choices"][0]
    assert text["delta"] == {"content": "x"} and text["logprobs"] == lp
    alone = chunks[2]["choices"][0]  # log-probabilities with no text after them go on their own
    assert alone["delta"] == {} and alone["logprobs"] == lp


def test_several_choices_get_a_role_each() -> None:
    chunks = sse_objects(
        encode(chat_request(n=2), [Start("c", "m", 1), TextDelta("a", 1), TextDelta("b", 0)])
    )
    assert [c["index"] for c in chunks[0]["choices"]] == [0, 1]
    assert [c["choices"][0]["index"] for c in chunks[1:-1]] == [1, 0]


def test_completions_stream() -> None:
    request = CanonicalRequest(protocol="openai.completions", model="m", stream=True, include_usage=True)
    events: list[Event] = [
        Start("cmpl-1", "m", 9),
        ReasoningDelta("hidden"),
        TextDelta("ab"),
        TextDelta("c"),
        Finish("length"),
        Usage(2, 3),
    ]
    objects = sse_objects(encode(request, events))
    assert objects[-1] == "[DONE]"
    for chunk in objects[:-1]:
        check_chunk_spec(chunk, chat=False)
        if all(c["finish_reason"] for c in chunk["choices"]):  # the SDK's type insists on one (OpenAI's own
            Completion.model_validate(chunk)  # streams send null until the end, as this does)
    assert [c["choices"][0]["text"] for c in objects[:-2]] == ["ab", "c", ""]
    assert objects[-3]["choices"][0]["finish_reason"] == "length"
    assert objects[-2]["usage"]["total_tokens"] == 5


def test_a_stream_without_start_still_gets_an_id_and_errors_are_in_band() -> None:
    encoder = FRONT.encoder(chat_request())
    chunk = sse_objects(encoder.encode(TextDelta("x")))[0]
    assert (
        chunk["id"].startswith("chatcmpl-")
        and isinstance(chunk["created"], int)
        and chunk["model"] == "client-model"
    )
    assert encoder.error("backend gone", code="stream_interrupted") == (
        b'data: {"error":{"message":"backend gone","type":"server_error","param":null,'
        b'"code":"stream_interrupted"}}\n\n'
    )
    assert (
        sse_objects(encoder.encode(StreamError("boom", "overloaded_error")))[0]["error"]["type"]
        == "overloaded_error"
    )
    assert FRONT.heartbeat == b":\n\n" and FRONT.family == "openai"


# -- whole responses -----------------------------------------------------------------------------------------


def test_chat_response_with_tool_calls_conforms() -> None:
    request = CanonicalRequest(protocol="openai.chat", model="client-model")
    events: list[Event] = [
        Start("chatcmpl-9", "backend", 1700000001),
        ReasoningDelta("plan"),
        ToolCallDelta(0, '{"a":', id="call_x", name="f"),
        ToolCallDelta(0, "1}"),
        Finish("tool_calls", native="tool_use"),
        Usage(12, 4, cached_input_tokens=2),
    ]
    body = orjson.loads(FRONT.response(request, events))
    ChatCompletion.model_validate(body)
    check_response_spec(body)
    message = body["choices"][0]["message"]
    assert message["content"] is None and message["refusal"] is None
    assert message["reasoning_content"] == "plan"
    assert message["tool_calls"] == [
        {"id": "call_x", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    ]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}
    assert (body["id"], body["object"], body["created"], body["model"]) == (
        "chatcmpl-9",
        "chat.completion",
        1700000001,
        "backend",
    )


def test_text_responses_conform() -> None:
    chat = orjson.loads(
        FRONT.response(
            CanonicalRequest(protocol="openai.chat", model="m"),
            [Start("c", "m", 1), TextDelta("hi "), TextDelta("there"), Finish("end")],
        )
    )
    ChatCompletion.model_validate(chat)
    check_response_spec(chat)
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "hi there", "refusal": None}
    assert chat["choices"][0]["logprobs"] is None and "usage" not in chat
    completion = orjson.loads(
        FRONT.response(
            CanonicalRequest(protocol="openai.completions", model="m"),
            [
                Start("c", "m", 1),
                TextDelta("a", 1),
                TextDelta("b", 0),
                Finish("length", 0),
                Finish("end", 1),
                Usage(1, 2),
            ],
        )
    )
    Completion.model_validate(completion)
    check_response_spec(completion, chat=False)
    assert [(c["index"], c["text"], c["finish_reason"]) for c in completion["choices"]] == [
        (0, "b", "length"),
        (1, "a", "stop"),
    ]


def test_errors_in_openais_shape() -> None:
    assert orjson.loads(FRONT.error(429, "slow down")) == {
        "error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": None}
    }
    types = {
        status: orjson.loads(FRONT.error(status, "x"))["error"]["type"]
        for status in (400, 401, 403, 404, 413, 422, 500, 502, 503)
    }
    assert types == {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "invalid_request_error",
        413: "invalid_request_error",
        422: "invalid_request_error",
        500: "server_error",
        502: "server_error",
        503: "server_error",
    }
    custom = orjson.loads(
        FRONT.error(404, "no", error_type="not_found", code="model_not_found", param="model")
    )
    assert custom == {
        "error": {"message": "no", "type": "not_found", "param": "model", "code": "model_not_found"}
    }
