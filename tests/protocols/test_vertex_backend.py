"""The Vertex AI adapter without a network: the pool's settings, requests as Vertex takes them, Gemini's
answers read, errors classified, tokens scheduled (a fake clock) and kept out of text."""

from __future__ import annotations

import json
from typing import Any

import pytest

from skyfabric.core.endpoints import fleet_endpoints
from skyfabric.core.errors import ConfigError, MalformedEvent
from skyfabric.core.fleet import parse_fleet
from skyfabric.protocols.backends.vertex import VERTEX_ANTHROPIC_VERSION, VertexBackend, VertexDecoder
from skyfabric.protocols.backends.vertex_auth import TokenSource, redact, refresh_delay
from skyfabric.protocols.backends.vertex_gemini_decoder import GeminiDecoder, decode_response
from skyfabric.protocols.canonical import (
    CanonicalRequest,
    End,
    Event,
    Finish,
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
from skyfabric.protocols.progress import Part, Progress
from skyfabric.protocols.registry import backend as registry_backend

BACKEND = VertexBackend()


def fleet(publisher: str = "google", **vertex: Any) -> dict[str, Any]:
    pool: dict[str, Any] = {
        "name": "pool",
        "accelerator": "managed",
        "engine": "vertex",
        "model": "m",
        "upstream_model": "gemini-2.5-pro" if publisher == "google" else "claude-sonnet-4-5@20250929",
        "vertex": {"project": "proj-1", "location": "us-east5", "publisher": publisher, **vertex},
    }
    return {
        "models": [{"name": "m"}],
        "providers": [{"name": "gcp", "regions": [{"name": "r", "pools": [pool]}]}],
    }


def endpoint(publisher: str = "google", **vertex: Any) -> Any:
    return fleet_endpoints(parse_fleet(fleet(publisher, **vertex)))[0]


def chat(text: str = "hello", **fields: Any) -> CanonicalRequest:
    return CanonicalRequest(
        protocol="openai.chat",
        model="m",
        messages=[Message("user", [{"type": "text", "text": text}])],
        **fields,
    )


# -- the fleet file --------------------------------------------------------------------------------------


def test_the_default_endpoint_is_the_locations_and_endpoints_override_it() -> None:
    assert endpoint().url == "https://us-east5-aiplatform.googleapis.com/v1"
    assert endpoint(location="global").url == "https://aiplatform.googleapis.com/v1"
    data = fleet()
    data["providers"][0]["regions"][0]["pools"][0]["endpoints"] = ["http://127.0.0.1:9/v1"]
    assert fleet_endpoints(parse_fleet(data))[0].url == "http://127.0.0.1:9/v1"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"vertex": None}, "needs a `vertex` section"),
        ({"engine": "vllm", "endpoints": ["http://x/v1"]}, "no other takes one"),
        ({"api_key_env": "KEY"}, "not api_key_env"),
        ({"vertex": {"project": "p-1", "location": "us-east5", "publisher": "meta"}}, "publisher"),
        ({"vertex": {"project": "Bad/Project", "location": "us-east5", "publisher": "google"}}, "project"),
        (
            {
                "vertex": {
                    "project": "p-1",
                    "location": "us-east5",
                    "publisher": "google",
                    "credentials_file": "/a.json",
                    "credentials_env": "B",
                }
            },
            "not both",
        ),
    ],
)
def test_a_bad_vertex_pool_is_refused_at_load(change: dict[str, Any], words: str) -> None:
    data = fleet()
    pool = data["providers"][0]["regions"][0]["pools"][0]
    pool.update(change)
    if pool.get("vertex") is None:
        pool.pop("vertex")
    with pytest.raises(ConfigError, match=words):
        parse_fleet(data)


def test_the_registry_gives_vertex_its_adapter() -> None:
    assert isinstance(registry_backend("vertex"), VertexBackend)


# -- Claude on Vertex --------------------------------------------------------------------------------------


def test_claude_goes_to_raw_predict_with_the_model_in_the_url_and_the_version_in_the_body() -> None:
    ep = endpoint("anthropic")
    for stream, method in ((False, "rawPredict"), (True, "streamRawPredict")):
        call = BACKEND.build(chat(max_tokens=50, stream=stream), ep)
        assert call.path == (
            b"/projects/proj-1/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:"
            + method.encode()
        )
        body = json.loads(call.body)
        assert "model" not in body
        assert body["anthropic_version"] == VERTEX_ANTHROPIC_VERSION
        assert body["max_tokens"] == 50 and body.get("stream", False) is stream
        names = [k for k, _ in call.headers]
        assert b"anthropic-version" not in names and b"x-api-key" not in names


def test_claude_on_vertex_continues_a_text_part_by_prefill_and_gemini_does_not() -> None:
    progress = Progress(parts=[Part("text", text="The answer is")])
    call = BACKEND.continuation(chat(max_tokens=50, stream=True), endpoint("anthropic"), progress, 3)
    assert call is not None and call.path.endswith(b":streamRawPredict")
    body = json.loads(call.body)
    assert body["messages"][-1] == {"role": "assistant", "content": "The answer is"}
    assert body["max_tokens"] == 47
    assert BACKEND.capabilities(endpoint("anthropic")).continues == frozenset({"text"})
    assert BACKEND.continuation(chat(stream=True), endpoint("google"), progress, 3) is None
    assert BACKEND.capabilities(endpoint("google")).continues == frozenset()


# -- Gemini requests ----------------------------------------------------------------------------------------


def test_gemini_request_maps_turns_tools_and_generation_config() -> None:
    request = CanonicalRequest(
        protocol="openai.chat",
        model="m",
        system=[{"type": "text", "text": "Be brief."}],
        messages=[
            Message("user", [{"type": "text", "text": "weather?"}]),
            Message(
                "assistant",
                [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "tool_use", "id": "call_7", "name": "get_weather", "input": {"city": "Oslo"}},
                ],
            ),
            Message("tool", [{"type": "tool_result", "tool_use_id": "call_7", "content": "rain"}]),
            Message("system", [{"type": "text", "text": "be kind"}]),
            Message(
                "user",
                [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"},
                    },
                    {"type": "image", "source": {"type": "url", "url": "gs://b/cat.webp"}},
                ],
            ),
        ],
        max_tokens=100,
        temperature=1.5,
        top_p=0.9,
        top_k=40,
        stop=["END"],
        seed=7,
        tools=[Tool("get_weather", "The weather", {"type": "object", "additionalProperties": False})],
        tool_choice=ToolChoice("tool", "get_weather"),
        thinking=Thinking(effort="low"),
        stream=True,
    )
    call = BACKEND.build(request, endpoint())
    assert call.path.endswith(b"/publishers/google/models/gemini-2.5-pro:streamGenerateContent?alt=sse")
    body = json.loads(call.body)
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "weather?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}}]},
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"content": "rain"}}},
                {"text": "<system-reminder>\nbe kind\n</system-reminder>"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBO"}},
                {"fileData": {"mimeType": "image/webp", "fileUri": "gs://b/cat.webp"}},
            ],
        },
    ]
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "The weather",
                    "parametersJsonSchema": {"type": "object", "additionalProperties": False},
                }
            ]
        }
    ]
    assert body["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}
    }
    assert body["generationConfig"] == {
        "maxOutputTokens": 100,
        "temperature": 1.5,
        "topP": 0.9,
        "topK": 40,
        "stopSequences": ["END"],
        "seed": 7,
        "thinkingConfig": {"thinkingBudget": 1024, "includeThoughts": True},
    }
    assert dict(call.headers)[b"accept"] == b"text/event-stream"


def test_gemini_thinking_off_is_a_zero_budget() -> None:
    body = json.loads(BACKEND.build(chat(thinking=Thinking(enabled=False)), endpoint()).body)
    assert body["generationConfig"] == {"thinkingConfig": {"thinkingBudget": 0}}
    assert BACKEND.build(chat(), endpoint()).path.endswith(b":generateContent")


# -- Gemini answers ------------------------------------------------------------------------------------------


def _chunk(parts: list[dict[str, Any]], **extra: Any) -> bytes:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}}
    candidate.update(extra.pop("candidate", {}))
    data = {"candidates": [candidate], "modelVersion": "gemini-2.5-pro", "responseId": "r1", **extra}
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\r\n\r\n"


STREAM = (
    _chunk([{"text": "Let me think ", "thought": True}])
    + _chunk([{"text": "Héllo, "}])
    + _chunk([{"text": "wörld 🙂"}])
    + _chunk(
        [{"functionCall": {"name": "get_weather", "args": {"city": "Zürich", "days": 2}}}],
        candidate={"finishReason": "STOP"},
        usageMetadata={
            "promptTokenCount": 12,
            "candidatesTokenCount": 9,
            "thoughtsTokenCount": 4,
            "cachedContentTokenCount": 5,
            "totalTokenCount": 25,
        },
    )
)


def _events(decoder: Any, data: bytes, step: int) -> tuple[list[Event], bytes]:
    events: list[Event] = []
    raw = b""
    for i in range(0, len(data), step):
        for chunk_raw, chunk_events in decoder.feed(data[i : i + step]):
            raw += chunk_raw
            events.extend(chunk_events)
    return events, raw


@pytest.mark.parametrize("step", [1, 2, 7, 10_000])
def test_a_gemini_stream_decodes_the_same_however_it_is_split(step: int) -> None:
    events, raw = _events(VertexDecoder(), STREAM, step)
    assert raw == STREAM  # every byte comes back once
    assert events == [
        Start(id="r1", model="gemini-2.5-pro"),
        ReasoningDelta("Let me think "),
        TextDelta("Héllo, "),
        TextDelta("wörld 🙂"),
        ToolCallDelta(index=0, id="call_0", name="get_weather", arguments='{"city":"Zürich","days":2}'),
        Finish(reason="tool_calls", native="STOP"),
        Usage(input_tokens=12, output_tokens=13, cached_input_tokens=5),
        End(),
    ]


@pytest.mark.parametrize(
    ("native", "canonical"),
    [
        ("STOP", "end"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("MALFORMED_FUNCTION_CALL", "end"),
        ("OTHER", "end"),
    ],
)
def test_gemini_finish_reasons_map_to_canonical_ones(native: str, canonical: str) -> None:
    events = decode_response(json.dumps({"candidates": [{"finishReason": native}]}).encode())
    assert Finish(reason=canonical, native=native) in events


def test_a_blocked_prompt_is_a_content_filter_with_an_empty_answer() -> None:
    body = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 8}}
    events = BACKEND.decode_response(json.dumps(body).encode())
    assert [e for e in events if isinstance(e, TextDelta | ToolCallDelta)] == []
    assert Finish(reason="content_filter", native="SAFETY") in events and events[-1] == End()


def test_an_error_in_the_stream_is_a_stream_error_and_a_chunk_after_the_end_is_malformed() -> None:
    error = b'data: {"error": {"code": 503, "message": "busy", "status": "UNAVAILABLE"}}\r\n\r\n'
    ((_, events),) = GeminiDecoder().feed(error)
    assert events == [StreamError("busy", "overloaded_error")]
    decoder = GeminiDecoder()
    decoder.feed(_chunk([{"text": "a"}], candidate={"finishReason": "STOP"}))
    with pytest.raises(MalformedEvent):
        decoder.feed(_chunk([{"text": "b"}]))
    with pytest.raises(MalformedEvent):
        GeminiDecoder().feed(b"data: {not json\r\n\r\n")


def test_the_decoder_reads_claudes_events_as_anthropics() -> None:
    stream = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","model":"claude",'
        b'"usage":{"input_tokens":3,"output_tokens":1}}}\n\n'
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":'
        b'{"type":"text","text":""}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":'
        b'{"type":"text_delta","text":"Hi there"}}\n\n'
    )
    events, raw = _events(BACKEND.decoder(), stream, 5)
    assert raw == stream
    assert TextDelta("Hi there") in events and events[0] == Start(id="msg_1", model="claude")


# -- errors --------------------------------------------------------------------------------------------------


def _google(code: int, status: str, message: str = "x") -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "status": status}}).encode()


@pytest.mark.parametrize(
    ("status", "body", "verdict"),
    [
        (429, _google(429, "RESOURCE_EXHAUSTED", "Quota exceeded"), "throttled"),
        (503, _google(503, "UNAVAILABLE"), "retryable"),
        (500, _google(500, "INTERNAL"), "retryable"),
        (504, _google(504, "DEADLINE_EXCEEDED"), "retryable"),
        (401, _google(401, "UNAUTHENTICATED"), "retryable"),
        (403, _google(403, "PERMISSION_DENIED"), "retryable"),
        (404, _google(404, "NOT_FOUND"), "retryable"),
        (400, _google(400, "INVALID_ARGUMENT", 'Unknown name "x"'), "client"),
        (
            400,
            _google(
                400,
                "INVALID_ARGUMENT",
                "The input token count (1048577) exceeds the maximum number of tokens allowed (1048576).",
            ),
            "context_length",
        ),
        (
            400,
            b'{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 2"}}',
            "context_length",
        ),
        (529, b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}', "overloaded"),
        (400, b"<html>bad request</html>", "client"),
    ],
)
def test_vertex_errors_are_classified(status: int, body: bytes, verdict: str) -> None:
    assert VertexBackend().classify(status, [], body).verdict == verdict


def test_a_429_backs_off_by_retry_after_else_doubling_while_they_keep_coming() -> None:
    now = [100.0]
    backend = VertexBackend(clock=lambda: now[0])
    assert backend.classify(429, [(b"retry-after", b"7")], b"{}").retry_after == 7.0
    waits = []
    for _ in range(7):
        waits.append(backend.classify(429, [], b"{}").retry_after)
        now[0] += 0.5
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    now[0] += 120  # quiet for a while: back to the start
    assert backend.classify(429, [], b"{}").retry_after == 1.0


# -- tokens --------------------------------------------------------------------------------------------------


def test_tokens_are_refreshed_before_they_expire_and_failures_back_off() -> None:
    # A one-hour token is refreshed five minutes early, a one-minute token half-way, none waits past expiry.
    assert refresh_delay(1000.0, 1000.0, 4600.0, 0) == 3300.0
    assert refresh_delay(1000.0, 1000.0, 1060.0, 0) == 30.0
    assert refresh_delay(1050.0, 1000.0, 1060.0, 0) == 0.0
    assert refresh_delay(1000.0, None, None, 0) == 0.0  # no token yet: now
    assert [refresh_delay(0.0, 0.0, 10.0, n) for n in (1, 2, 3, 6, 9)] == [1.0, 2.0, 4.0, 30.0, 30.0]


class _Credentials:
    def __init__(self) -> None:
        self.token: str | None = None
        self.expiry: Any = None
        self.quota_project_id = "billing-proj"

    def refresh(self, request: Any) -> None:
        import datetime

        self.token = "ya29.secret-token-value"
        self.expiry = datetime.datetime(2030, 1, 1)


def test_the_request_path_reads_the_cached_token_and_counts_expired_reads() -> None:
    now = [0.0]
    source = TokenSource("k", _Credentials(), clock=lambda: now[0], transport=lambda: None)
    assert source.header() == []  # nothing fetched yet: no header, no fetch
    source.fetch()
    assert source.header() == [
        (b"authorization", b"Bearer ya29.secret-token-value"),
        (b"x-goog-user-project", b"billing-proj"),
    ]
    assert source.expired_reads == 0
    now[0] = 2e9
    source.header()
    assert source.expired_reads == 1 and source.refreshes == 1


def test_secrets_are_redacted_from_error_text() -> None:
    text = (
        "token ya29.a0AfB_byC-xyz.123 then eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0.c2ln and Bearer abc.def "
        '{"access_token": "tok", "private_key": "-----BEGIN PRIVATE KEY-----\\nMIIE\\n-----END '
        'PRIVATE KEY-----"}'
        "\n-----BEGIN PRIVATE KEY-----\nMIIEvQ\n-----END PRIVATE KEY-----"
    )
    clean = redact(text)
    for secret in ("ya29.a0AfB", "eyJhbGci", "abc.def", '"tok"', "MIIE"):
        assert secret not in clean


def test_each_kind_of_credentials_json_gets_its_own_loader(tmp_path: Any) -> None:
    from skyfabric.protocols.backends.vertex_auth import credentials_from_file

    user = {"type": "authorized_user", "client_id": "c", "client_secret": "s", "refresh_token": "r"}
    federated = {
        "type": "external_account",
        "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k8s",
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": "https://sts.googleapis.com/v1/token",
        "credential_source": {"file": "/var/run/secrets/tokens/gcp-ksa/token"},
    }
    for info, kind in ((user, "Credentials"), (federated, "Credentials")):
        path = tmp_path / f"{info['type']}.json"
        path.write_text(json.dumps(info))
        credentials = credentials_from_file(str(path))
        assert type(credentials).__name__ == kind
        assert type(credentials).__module__.endswith(("oauth2.credentials", "identity_pool"))
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"type": "gdch_service_account"}))
    with pytest.raises(ConfigError, match="Application Default Credentials"):
        credentials_from_file(str(odd))
    with pytest.raises(ConfigError, match="cannot read"):
        credentials_from_file(str(tmp_path / "missing.json"))
