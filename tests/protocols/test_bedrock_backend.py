"""The Bedrock adapter: Converse and InvokeModel requests as Bedrock takes them, its frames and errors read.

Frames come from the stand-in's encoder (``tests/support/eventstream.py``, written from the spec) and its
answers; requests are checked by the stand-in's own SigV4 verifier and Converse validator.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from botocore.credentials import ReadOnlyCredentials

from skyfabric.core.endpoints import Endpoint, pool_endpoint
from skyfabric.core.errors import ConfigError, InvalidRequest, MalformedEvent
from skyfabric.core.fleet import Pool, parse_fleet
from skyfabric.protocols.backends.bedrock import (
    THROTTLE_BASE,
    THROTTLE_MAX,
    BedrockBackend,
    throttle_backoff,
)
from skyfabric.protocols.backends.bedrock_eventstream import FrameReader
from skyfabric.protocols.canonical import (
    CanonicalRequest,
    End,
    Event,
    Finish,
    Message,
    ReasoningDelta,
    ReasoningSignature,
    StreamError,
    TextDelta,
    Thinking,
    Tool,
    ToolCallDelta,
    ToolChoice,
    Usage,
)
from skyfabric.protocols.progress import Part, Progress
from tests.support import eventstream
from tests.support.anthropic_answer import Answer, Block, group_tokens, split_json
from tests.support.bedrock_standin import (
    ACCESS_KEY,
    SECRET_KEY,
    BedrockError,
    converse_frames,
    converse_to_anthropic,
    verify_sigv4,
)

SONNET = "anthropic.claude-sonnet-4-5-20250929-v1:0"


class StaticCredentials:
    """Stands in for :class:`AwsCredentials`: a fixed snapshot, no botocore session."""

    def __init__(self, profile: str | None, secret: str = SECRET_KEY) -> None:
        self.profile = profile
        self.frozen = ReadOnlyCredentials(ACCESS_KEY, secret, None)

    def current(self) -> ReadOnlyCredentials:
        return self.frozen

    def close(self) -> None:
        pass


def backend(**options: Any) -> BedrockBackend:
    return BedrockBackend(credentials=StaticCredentials, **options)  # type: ignore[arg-type]


def endpoint(model: str = SONNET, url: str = "http://127.0.0.1:8443", **section: Any) -> Endpoint:
    pool = Pool(
        name="claude",
        accelerator="managed",
        engine="bedrock",
        model="m",
        upstream_model=model,
        endpoints=[url],
        bedrock={"region": "us-east-1", **section},
    )
    return pool_endpoint("aws", "us-east-1", pool, 0, url)


def request(stream: bool = True, **fields: Any) -> CanonicalRequest:
    fields.setdefault("messages", [Message("user", [{"type": "text", "text": "Hi"}])])
    return CanonicalRequest(protocol="openai.chat", model="m", stream=stream, **fields)


def verify(call: Any, ep: Endpoint, secret: str = SECRET_KEY) -> None:
    """The stand-in's check, on the request exactly as the gateway would send it."""
    headers = {k.decode(): v.decode() for k, v in call.headers}
    headers["host"] = f"{ep.origin[1]}:{ep.origin[2]}"
    verify_sigv4(
        "POST",
        ep.base_path + call.path.decode(),
        headers,
        call.body,
        keys={ACCESS_KEY: (secret, None)},
        region="us-east-1",
        now=time.time(),
    )


# -- the fleet file -------------------------------------------------------------------------------------


def fleet(pool: dict[str, Any]) -> Any:
    base = {"name": "p", "accelerator": "managed", "engine": "bedrock", "model": "m", **pool}
    return parse_fleet(
        {
            "models": [{"name": "m"}],
            "providers": [{"name": "aws", "regions": [{"name": "r", "pools": [base]}]}],
        }
    )


def test_a_bedrock_pool_defaults_to_its_regions_endpoint_and_to_converse() -> None:
    pool = fleet({"bedrock": {"region": "eu-central-1"}}).providers[0].regions[0].pools[0]
    assert pool.endpoints == ["https://bedrock-runtime.eu-central-1.amazonaws.com"]
    assert pool.bedrock is not None and pool.bedrock.api == "converse" and pool.bedrock.profile is None
    given = fleet(
        {"bedrock": {"region": "us-west-2", "api": "invoke"}, "endpoints": ["http://10.0.0.1:9000"]}
    )
    assert given.providers[0].regions[0].pools[0].endpoints == ["http://10.0.0.1:9000"]


@pytest.mark.parametrize(
    ("pool", "words"),
    [
        ({}, "needs a `bedrock` section"),
        ({"bedrock": {"region": "us-east-1", "aws_secret_access_key": "x"}}, "aws_secret_access_key"),
        ({"bedrock": {"region": "Virginia"}}, "region"),
        ({"bedrock": {"region": "us-east-1", "api": "chat"}}, "api"),
        ({"engine": "vllm", "endpoints": ["http://x"], "bedrock": {"region": "us-east-1"}}, "only it takes"),
    ],
)
def test_a_bedrock_section_is_checked_at_load(pool: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        fleet(pool)


def test_invoke_is_for_claude_models_only() -> None:
    with pytest.raises(ConfigError, match="Claude"):
        backend().prepare(endpoint("meta.llama3-70b-instruct-v1:0", api="invoke"))
    backend().prepare(endpoint(api="invoke"))


# -- requests -------------------------------------------------------------------------------------------


def test_converse_request_is_signed_and_shaped_as_bedrock_takes_it() -> None:
    ep = endpoint()
    req = request(
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        max_tokens=300,
        temperature=1.7,  # an OpenAI client's: clamped to 1
        top_p=0.9,
        top_k=40,
        stop=["END"],
        tools=[
            Tool("get_weather", "The weather", {"type": "object", "properties": {"city": {"type": "string"}}})
        ],
        tool_choice=ToolChoice("tool", "get_weather"),
        betas=["context-1m-2025-08-07"],
    )
    call = backend().build(req, ep)
    assert call.path == b"/model/anthropic.claude-sonnet-4-5-20250929-v1%3A0/converse-stream"
    verify(call, ep)
    body = json.loads(call.body)
    assert body["system"] == [{"text": "Be brief."}, {"cachePoint": {"type": "default"}}]
    assert body["inferenceConfig"] == {
        "maxTokens": 300,
        "temperature": 1.0,
        "topP": 0.9,
        "stopSequences": ["END"],
    }
    assert body["additionalModelRequestFields"] == {"top_k": 40, "anthropic_beta": ["context-1m-2025-08-07"]}
    tool = body["toolConfig"]["tools"][0]["toolSpec"]
    assert tool["inputSchema"] == {"json": {"type": "object", "properties": {"city": {"type": "string"}}}}
    assert body["toolConfig"]["toolChoice"] == {"tool": {"name": "get_weather"}}
    converse_to_anthropic(body, "claude-sonnet-4-5-20250929")  # the stand-in's validator takes it


def test_converse_turns_alternate_and_carry_tools_images_and_thinking() -> None:
    png = base64.b64encode(b"\x89PNG fake").decode()
    messages = [
        Message(
            "user",
            [
                {"type": "text", "text": "Look"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
            ],
        ),
        Message("user", [{"type": "text", "text": "and call"}]),
        Message(
            "assistant",
            [
                {"type": "thinking", "thinking": "hm", "signature": "c2ln"},
                {"type": "thinking", "thinking": "unsigned: another vendor's"},
                {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}},
            ],
        ),
        Message(
            "tool", [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny", "is_error": False}]
        ),
        Message("system", [{"type": "text", "text": "Answer in French."}]),
        Message("assistant", [{"type": "text", "text": "Il fait  "}]),
    ]
    req = request(
        messages=messages, tools=[Tool("get_weather")], thinking=Thinking(budget_tokens=2048), max_tokens=4000
    )
    body = json.loads(backend().build(req, endpoint()).body)
    turns = body["messages"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[0]["content"] == [
        {"text": "Look"},
        {"image": {"format": "png", "source": {"bytes": png}}},
        {"text": "and call"},
    ]
    assert turns[1]["content"] == [
        {"reasoningContent": {"reasoningText": {"text": "hm", "signature": "c2ln"}}},
        {"toolUse": {"toolUseId": "t1", "name": "get_weather", "input": {"city": "Paris"}}},
    ]
    assert turns[2]["content"][0] == {"toolResult": {"toolUseId": "t1", "content": [{"text": "sunny"}]}}
    assert "Answer in French." in turns[2]["content"][1]["text"]
    assert turns[3]["content"] == [{"text": "Il fait"}]  # a final assistant turn loses trailing whitespace
    assert body["additionalModelRequestFields"]["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    with pytest.raises(InvalidRequest, match="base64"):
        url_image = {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
        backend().build(request(messages=[Message("user", [url_image])]), endpoint())


def test_invoke_body_is_anthropics_with_bedrocks_version() -> None:
    ep = endpoint(api="invoke")
    req = request(max_tokens=100, metadata={"user_id": "u1"}, betas=["interleaved-thinking-2025-05-14"])
    call = backend().build(req, ep)
    assert call.path.endswith(b"/invoke-with-response-stream")
    assert (b"x-amzn-bedrock-accept", b"application/json") in call.headers
    verify(call, ep)
    body = json.loads(call.body)
    assert body["anthropic_version"] == "bedrock-2023-05-31"
    assert body["anthropic_beta"] == ["interleaved-thinking-2025-05-14"]
    assert not {"model", "stream", "metadata"} & body.keys()
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    whole = backend().build(request(stream=False, max_tokens=5), ep)
    assert whole.path.endswith(b"/invoke") and (b"accept", b"application/json") in whole.headers


def test_an_inference_profile_is_sent_as_the_model_id() -> None:
    ep = endpoint(
        inference_profile="arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc"
    )
    call = backend().build(request(), ep)
    assert call.path == (
        b"/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Aapplication-inference-profile%2Fabc"
        b"/converse-stream"
    )
    verify(call, ep)


def test_a_signature_with_another_secret_is_refused() -> None:
    ep = endpoint()
    call = BedrockBackend(credentials=lambda p: StaticCredentials(p, "not-the-secret")).build(request(), ep)  # type: ignore[arg-type,return-value]
    with pytest.raises(BedrockError, match="signature we calculated does not match") as refused:
        verify(call, ep)
    assert refused.value.status == 403
    tampered = call.__class__(call.path, call.headers, call.body.replace(b"Hi", b"Yo"))
    with pytest.raises(BedrockError, match="does not match"):
        verify(tampered, ep)


# -- continuation ---------------------------------------------------------------------------------------


def progress(text: str) -> Progress:
    return Progress(parts=[Part("text", text=text)])


@pytest.mark.parametrize("api", ["converse", "invoke"])
def test_claude_continues_a_prefix_through_either_api(api: str) -> None:
    ep = endpoint(api=api)
    caps = backend().capabilities(ep)
    assert caps.continues == frozenset({"text"}) and caps.thinking and caps.images and not caps.n
    call = backend().continuation(request(max_tokens=100), ep, progress("def route(request):"), 7)
    assert call is not None
    verify(call, ep)
    body = json.loads(call.body)
    if api == "converse":
        assert body["messages"][-1] == {"role": "assistant", "content": [{"text": "def route(request):"}]}
        assert body["inferenceConfig"]["maxTokens"] == 93
    else:
        assert body["messages"][-1] == {"role": "assistant", "content": "def route(request):"}
        assert body["max_tokens"] == 93 and body["anthropic_version"] == "bedrock-2023-05-31"


@pytest.mark.parametrize(
    ("model", "req", "given"),
    [
        ("anthropic.claude-opus-4-6-v1", request(), progress("x")),  # Claude 4.6+: no prefill
        ("meta.llama3-70b-instruct-v1:0", request(), progress("x")),  # not Claude: replayed
        (SONNET, request(thinking=Thinking(budget_tokens=2048)), progress("x")),
        (SONNET, request(tool_choice=ToolChoice("any")), progress("x")),
        (SONNET, request(), Progress(parts=[Part("tool", text='{"ci')])),
        (SONNET, request(max_tokens=5), progress("x")),  # all 5 tokens already sent
    ],
)
def test_what_converse_does_not_continue_is_replayed(
    model: str, req: CanonicalRequest, given: Progress
) -> None:
    assert backend().continuation(req, endpoint(model), given, 5) is None


# -- decoding -------------------------------------------------------------------------------------------


def sample_answer() -> Answer:
    thinking = Block("thinking", "let me think about it", signature="c2lnbmF0dXJl")
    text = Block("text", "Paris is sunny — naïve 🙂 today.")
    arguments = json.dumps({"city": 'Pa"ris'}, ensure_ascii=False)
    tool = Block("tool_use", arguments, tool_id="tooluse_01", tool_name="get_weather")
    for block in (thinking, text):
        block.pieces = group_tokens(block.text, (3, 1, 2))
    tool.pieces = split_json(tool.text, b"seed")
    return Answer([thinking, text, tool], "tool_use")


def usage() -> dict[str, int]:
    return {"input_tokens": 12, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 0}


def feed_all(data: bytes, step: int) -> tuple[bytes, list[Event]]:
    decoder = BedrockBackend().decoder()
    raw, events = b"", []
    for at in range(0, len(data), step):
        for frame, evs in decoder.feed(data[at : at + step]):
            raw += frame
            events += evs
    return raw, events


@pytest.mark.parametrize("step", [1, 7, 4096])
def test_converse_frames_decode_whatever_the_split(step: int) -> None:
    answer = sample_answer()
    data = b"".join(frame for frame, _, _ in converse_frames(answer, usage()))
    raw, events = feed_all(data, step)
    assert raw == data  # every byte comes back once, inside its frame
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "let me think about it"
    assert [e.signature for e in events if isinstance(e, ReasoningSignature)] == ["c2lnbmF0dXJl"]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == answer.blocks[1].text
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert (calls[0].id, calls[0].name) == ("tooluse_01", "get_weather")
    assert json.loads("".join(c.arguments for c in calls)) == {"city": 'Pa"ris'}
    assert [e.reason for e in events if isinstance(e, Finish)] == ["tool_calls"]
    final = [e for e in events if isinstance(e, Usage)][-1]
    assert (final.input_tokens, final.cached_input_tokens, final.output_tokens) == (
        42,
        30,
        answer.output_tokens,
    )
    assert isinstance(events[-1], End)


def test_invoke_chunks_carry_anthropics_events() -> None:
    events_in = [
        {
            "type": "message_start",
            "message": {
                "id": "msg_bdrk_01",
                "model": "claude-sonnet-4-5-20250929",
                "usage": {"input_tokens": 9, "output_tokens": 1},
            },
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello there"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}},
        {
            "type": "message_stop",
            "amazon-bedrock-invocationMetrics": {"inputTokenCount": 9, "outputTokenCount": 3},
        },
    ]
    data = b"".join(
        eventstream.event("chunk", {"bytes": base64.b64encode(json.dumps(e).encode()).decode(), "p": "abc"})
        for e in events_in
    )
    _, events = feed_all(data, 5)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Hello there"
    assert [e.native for e in events if isinstance(e, Finish)] == ["end_turn"]
    assert [e.output_tokens for e in events if isinstance(e, Usage)][-1] == 3
    assert isinstance(events[-1], End)


@pytest.mark.parametrize(
    ("kind", "error_type"),
    [
        ("throttlingException", "rate_limit_error"),
        ("serviceUnavailableException", "overloaded_error"),
        ("modelStreamErrorException", "api_error"),
        ("validationException", "invalid_request_error"),
    ],
)
def test_an_exception_frame_is_an_in_band_error(kind: str, error_type: str) -> None:
    start = eventstream.event("messageStart", {"role": "assistant"})
    _, events = feed_all(start + eventstream.exception(kind, "Too many tokens"), 64)
    error = events[-1]
    assert isinstance(error, StreamError) and error.type == error_type
    assert error.message == f"{kind}: Too many tokens"


@pytest.mark.parametrize("where", ["prelude", "message"])
def test_a_frame_with_a_bad_crc_is_malformed(where: str) -> None:
    frame = bytearray(
        eventstream.event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "x"}})
    )
    frame[9 if where == "prelude" else -1] ^= 0xFF
    with pytest.raises(MalformedEvent, match=r"(?i)checksum|crc"):
        FrameReader().feed(bytes(frame))


def test_a_whole_converse_answer_decodes() -> None:
    body = json.dumps(
        {
            "output": {
                "message": {
                    "role": "assistant",
                    "content": [
                        {"text": "Hi there"},
                        {"toolUse": {"toolUseId": "t", "name": "f", "input": {"a": 1}}},
                    ],
                }
            },
            "stopReason": "tool_use",
            "usage": {"inputTokens": 5, "outputTokens": 4, "totalTokens": 9},
            "metrics": {"latencyMs": 100},
        }
    ).encode()
    events = BedrockBackend().decode_response(body)
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Hi there"]
    assert [e.arguments for e in events if isinstance(e, ToolCallDelta)] == ['{"a":1}']
    assert [e.reason for e in events if isinstance(e, Finish)] == ["tool_calls"]


# -- classification -------------------------------------------------------------------------------------


def error(kind: str, message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    header = f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/".encode()
    return [(b"x-amzn-errortype", header)], json.dumps({"message": message}).encode()


@pytest.mark.parametrize(
    ("status", "kind", "message", "verdict"),
    [
        (429, "ThrottlingException", "Too many requests, please wait before trying again.", "throttled"),
        (400, "ServiceQuotaExceededException", "quota exceeded", "throttled"),
        (429, "ModelNotReadyException", "Model is not ready", "overloaded"),
        (503, "ServiceUnavailableException", "Bedrock is unable to process your request.", "overloaded"),
        (500, "InternalServerException", "internal", "retryable"),
        (424, "ModelErrorException", "The model returned an error.", "retryable"),
        (408, "ModelTimeoutException", "Model has timed out", "retryable"),
        (403, "AccessDeniedException", "You don't have access to the model", "retryable"),
        (403, "InvalidSignatureException", "The request signature we calculated does not match", "retryable"),
        (
            403,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
            "retryable",
        ),
        (404, "ResourceNotFoundException", "Model not found", "retryable"),
        (400, "ValidationException", "Input is too long for requested model.", "context_length"),
        (400, "ValidationException", "too many tokens: 210000 > 200000", "context_length"),
        (400, "ValidationException", "prompt is too long: 209353 tokens > 199999 maximum", "context_length"),
        (
            400,
            "ValidationException",
            "The model returned the following errors: This model does not support assistant message prefill.",
            "retryable",
        ),
        (400, "ValidationException", "messages.0.content: blank text", "client"),
    ],
)
def test_errors_are_classified(status: int, kind: str, message: str, verdict: str) -> None:
    headers, body = error(kind, message)
    assert backend().classify(status, headers, body).verdict == verdict


def test_throttling_backs_off_while_it_lasts() -> None:
    now = [100.0]
    adapter = BedrockBackend(credentials=StaticCredentials, clock=lambda: now[0])  # type: ignore[arg-type]
    headers, body = error("ThrottlingException", "slow down")
    waits = []
    for _ in range(7):
        outcome = adapter.classify(429, headers, body)
        waits.append(outcome.retry_after)
        now[0] += outcome.retry_after or 0
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0]
    now[0] += 100  # quiet for a while: back to the base
    assert adapter.classify(429, headers, body).retry_after == THROTTLE_BASE
    assert adapter.classify(429, [(b"retry-after", b"7"), *headers], body).retry_after == 7.0
    assert throttle_backoff(None, None, 0.0) == THROTTLE_BASE
    assert throttle_backoff(THROTTLE_MAX, 0.0, THROTTLE_MAX) == THROTTLE_MAX
