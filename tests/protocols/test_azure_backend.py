"""The Azure OpenAI adapter on its own: the pool's section, routes, auth headers, bodies, the decoder's view
of Azure's filter chunks, the classification table, capabilities."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from skyfabric.core.endpoints import pool_endpoint
from skyfabric.core.errors import ConfigError
from skyfabric.core.fleet import parse_fleet
from skyfabric.core.fleet_azure import AzureOpenAISettings
from skyfabric.protocols.backends.azure import AzureOpenAIBackend, azure_retry_after, route
from skyfabric.protocols.canonical import End, Finish, Start, TextDelta, ToolCallDelta, Usage
from skyfabric.protocols.frontends.anthropic import AnthropicFrontend
from skyfabric.protocols.frontends.openai import OpenAIFrontend
from skyfabric.protocols.progress import Part, Progress
from skyfabric.protocols.registry import backend

KEY = "azure-key-0123456789abcdef"


def fleet(pool: dict[str, Any]) -> Any:
    base = {
        "name": "pool",
        "accelerator": "managed",
        "engine": "azure-openai",
        "model": "m",
        "endpoints": ["https://myres.openai.azure.com"],
    }
    return parse_fleet(
        {
            "models": [{"name": "m"}],
            "providers": [{"name": "az", "regions": [{"name": "eastus2", "pools": [{**base, **pool}]}]}],
        }
    )


def endpoint(monkeypatch: pytest.MonkeyPatch, **pool: Any) -> Any:
    monkeypatch.setenv("AZ_KEY", KEY)
    pool.setdefault("api_key_env", "AZ_KEY")
    parsed = fleet(pool).providers[0].regions[0].pools[0]
    return pool_endpoint("az", "eastus2", parsed, 0, parsed.endpoints[0])


# -- the fleet file ---------------------------------------------------------------------------------------


def test_the_section_defaults_to_v1_and_api_key() -> None:
    settings = AzureOpenAISettings()
    assert settings.api_version == "v1" and settings.auth == "api-key" and not settings.deployment_route
    assert AzureOpenAISettings(api_version="2025-01-01-preview").deployment_route


@pytest.mark.parametrize(
    ("pool", "says"),
    [
        ({"api_key_env": None}, "needs api_key_env"),
        ({"azure": {"api_version": "2024-10"}}, "must be 'v1' or a dated version"),
        ({"azure": {"api_version": "latest"}}, "must be 'v1' or a dated version"),
        ({"azure": {"tenant_id": "t"}}, "auth 'api-key' takes no tenant_id"),
        (
            {"azure": {"auth": "entra", "client_id": "c"}, "api_key_env": None},
            "needs tenant_id and client_id",
        ),
        ({"azure": {"auth": "entra", "tenant_id": "t", "client_id": "c"}}, "api_key_env would be ignored"),
        (
            {
                "azure": {
                    "auth": "entra",
                    "tenant_id": "t",
                    "client_id": "c",
                    "client_secret_env": "S",
                    "federated_token_file": "/f",
                },
                "api_key_env": None,
            },
            "not both",
        ),
        (
            {
                "azure": {
                    "auth": "entra",
                    "tenant_id": "t",
                    "client_id": "c",
                    "authority": "http://login.example",
                },
                "api_key_env": None,
            },
            "must be an https:// URL",
        ),
        ({"azure": {"deployment": "bad name"}}, "deployment"),
        ({"azure": {"region": "eastus"}}, "region"),
        ({"engine": "vllm", "azure": {}}, "`azure` is for engine 'azure-openai'"),
    ],
)
def test_the_section_is_checked_at_load(pool: dict[str, Any], says: str) -> None:
    pool = {"api_key_env": "AZ_KEY", **pool}
    if pool.get("api_key_env") is None:
        pool.pop("api_key_env")
    with pytest.raises(ConfigError) as caught:
        fleet(pool)
    assert says in str(caught.value)


def test_registry_speaks_azure_openai() -> None:
    adapter = backend("azure-openai")
    assert isinstance(adapter, AzureOpenAIBackend) and adapter.family == "openai"


# -- routes, auth, bodies ---------------------------------------------------------------------------------


def test_routes() -> None:
    v1 = AzureOpenAISettings()
    dated = AzureOpenAISettings(api_version="2024-10-21")
    assert route(v1, "dep") == b"/openai/v1/chat/completions"
    assert route(v1, "dep", completions=True) == b"/openai/v1/completions"
    assert route(dated, "my dep") == b"/openai/deployments/my%20dep/chat/completions?api-version=2024-10-21"


def test_openai_client_on_the_deployment_route_passes_its_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = endpoint(monkeypatch, azure={"api_version": "2024-10-21", "deployment": "gpt4o-prod"})
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": true}'
    request = OpenAIFrontend().parse(b"/v1/chat/completions", raw, [])
    call = AzureOpenAIBackend().build(request, ep, usage=True)
    assert call.body is raw  # the model is ignored on this route: no re-encoding
    assert call.path == b"/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    headers = dict(call.headers)
    assert headers[b"api-key"] == KEY.encode() and b"authorization" not in headers
    assert headers[b"accept"] == b"text/event-stream"


def test_openai_client_on_v1_gets_the_deployment_as_model(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = endpoint(monkeypatch, upstream_model="gpt-4o-eu")
    raw = b'{"model":"m","messages":[{"role":"user","content":"Hi"}],"temperature":0}'
    call = AzureOpenAIBackend().build(OpenAIFrontend().parse(b"/v1/chat/completions", raw, []), ep)
    assert call.path == b"/openai/v1/chat/completions"
    assert orjson.loads(call.body) == {**orjson.loads(raw), "model": "gpt-4o-eu"}
    same = b'{"model":"gpt-4o-eu","messages":[{"role":"user","content":"Hi"}]}'
    assert (
        AzureOpenAIBackend().build(OpenAIFrontend().parse(b"/v1/chat/completions", same, []), ep).body is same
    )


def test_anthropic_client_is_translated_to_openai_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = endpoint(monkeypatch, azure={"deployment": "o3-mini"})
    body = {
        "model": "m",
        "max_tokens": 300,
        "stream": True,
        "system": "Be brief.",
        "thinking": {"type": "enabled", "budget_tokens": 4000},
        "top_k": 5,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    request = AnthropicFrontend().parse(
        b"/v1/messages", orjson.dumps(body), [(b"anthropic-version", b"2023-06-01")]
    )
    request.lower()
    sent = orjson.loads(AzureOpenAIBackend().build(request, ep).body)
    assert sent["model"] == "o3-mini" and sent["max_completion_tokens"] == 300
    assert sent["reasoning_effort"] == "medium" and sent["stream_options"] == {"include_usage": True}
    assert "top_k" not in sent and "chat_template_kwargs" not in sent and "max_tokens" not in sent


def test_continues_nothing_and_replays(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = endpoint(monkeypatch)
    adapter = AzureOpenAIBackend()
    assert adapter.capabilities(ep).continues == frozenset()
    request = OpenAIFrontend().parse(
        b"/v1/chat/completions", b'{"model":"m","messages":[{"role":"user","content":"Hi"}]}', []
    )
    assert adapter.continuation(request, ep, Progress(parts=[Part("text", "Hello")]), 1) is None
    fresh = adapter.continuation(request, ep, Progress(), 0)
    assert fresh is not None and fresh.path == b"/openai/v1/chat/completions"
    assert dict(fresh.headers)[b"api-key"] == KEY.encode()


# -- decoding Azure's streams ------------------------------------------------------------------------------


FILTER_FIRST = (
    b'data: {"choices":[],"created":0,"id":"","model":"","object":"",'
    b'"prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}]}\n\n'
)


def chunk(delta: dict[str, Any], reason: str | None = None, results: dict[str, Any] | None = None) -> bytes:
    choice = {"content_filter_results": results or {}, "delta": delta, "finish_reason": reason, "index": 0}
    data = {"choices": [choice], "created": 1, "id": "chatcmpl-1", "model": "gpt-4o-2024-11-20"}
    return b"data: " + orjson.dumps(data) + b"\n\n"


def test_the_prompt_filter_chunk_is_no_start_and_no_content() -> None:
    decoder = AzureOpenAIBackend().decoder()
    stream = (
        FILTER_FIRST
        + chunk({"role": "assistant", "content": ""})
        + chunk({"content": "Hello the"}, results={"violence": {"filtered": False, "severity": "safe"}})
        + b'data: {"choices":[{"index":0,"finish_reason":null,"content_filter_results":{},'
        b'"content_filter_offsets":{"check_offset":0,"start_offset":0,"end_offset":9}}],"id":"chatcmpl-1"}\n\n'
        + chunk({}, "content_filter", {"violence": {"filtered": True, "severity": "medium"}})
        + b'data: {"choices":[],"id":"chatcmpl-1","usage":{"prompt_tokens":9,"completion_tokens":2}}\n\n'
        + b"data: [DONE]\n\n"
    )
    items = decoder.feed(stream)
    assert items[0] == (FILTER_FIRST, [])  # the raw bytes still go to an OpenAI client
    events = [e for _, evs in items for e in evs]
    assert events[0] == Start("chatcmpl-1", "gpt-4o-2024-11-20", 1)
    assert [e for e in events if isinstance(e, TextDelta)] == [TextDelta("Hello the")]
    assert Finish("content_filter", native="content_filter") in events
    assert isinstance(events[-2], Usage) and isinstance(events[-1], End)


def test_whole_responses_and_tool_calls_decode() -> None:
    body = {
        "choices": [
            {
                "content_filter_results": {},
                "finish_reason": "tool_calls",
                "index": 0,
                "message": {
                    "content": None,
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
            }
        ],
        "id": "chatcmpl-2",
        "model": "gpt-4o",
        "created": 5,
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }
    events = AzureOpenAIBackend().decode_response(orjson.dumps(body))
    assert (
        ToolCallDelta(0, "{}", "call_1", "f") in events
        and Finish("tool_calls", native="tool_calls") in events
    )


# -- classification ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "body", "verdict", "after"),
    [
        (429, [(b"retry-after", b"3"), (b"retry-after-ms", b"2500")], b"{}", "throttled", 2.5),
        (429, [(b"retry-after", b"3")], b"{}", "throttled", 3.0),
        (500, [], b"{}", "retryable", None),
        (503, [], b"{}", "retryable", None),
        (408, [], b"{}", "retryable", None),
        (401, [], b'{"error":{"code":"401","message":"Access denied"}}', "retryable", None),
        (403, [], b"{}", "retryable", None),
        (404, [], b'{"error":{"code":"DeploymentNotFound"}}', "retryable", None),
        (
            400,
            [],
            b'{"error":{"code":"context_length_exceeded","message":"maximum context length"}}',
            "context_length",
            None,
        ),
        (
            400,
            [],
            b'{"error":{"code":"content_filter","innererror":{"code":"ResponsibleAIPolicyViolation"}}}',
            "client",
            None,
        ),
        (400, [], b'{"error":{"message":"Unrecognized request argument supplied: foo"}}', "client", None),
        (422, [], b"{}", "client", None),
        (200, [], b"", "ok", None),
    ],
)
def test_classification(status: int, headers: Any, body: bytes, verdict: str, after: float | None) -> None:
    outcome = AzureOpenAIBackend().classify(status, headers, body)
    assert outcome.verdict == verdict
    if after is not None:
        assert outcome.retry_after == pytest.approx(after)


def test_retry_after_ms_wins_whatever_the_order() -> None:
    assert azure_retry_after([(b"Retry-After-Ms", b"120")], 0.0) == pytest.approx(0.12)
    assert azure_retry_after([(b"retry-after", b"7"), (b"retry-after-ms", b"bad")], 0.0) == 7.0
    assert azure_retry_after([], 0.0) is None
