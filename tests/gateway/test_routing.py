"""The gateway answers like OpenAI, through the official SDK, and routes across endpoints."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.conftest import MakeGateway
from tests.support.fake_upstream import FakeUpstream, expected_text


async def test_chat_non_streaming_through_sdk(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"aws": [FakeUpstream("a", tokens=5)]})
    client = gw.client()
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == expected_text(5)
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert raw.headers["x-skyfabric-backend"] == "aws/r1/pool/0"


async def test_chat_streaming_through_sdk_with_usage(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"aws": [FakeUpstream("a", tokens=6)]})
    stream = await gw.client().chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, reasons, usage = "", [], None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].finish_reason:
                reasons.append(chunk.choices[0].finish_reason)
        if chunk.usage:
            usage = chunk.usage
    assert text == expected_text(6)
    assert reasons == ["stop"]
    assert usage is not None and usage.completion_tokens == 6


async def test_completions_and_alias(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"aws": [FakeUpstream("a", tokens=3)]})
    completion = await gw.client().completions.create(model="alias-m", prompt="def f():")
    assert completion.choices[0].text == expected_text(3)
    stream = await gw.client().completions.create(model="m", prompt="x", stream=True)
    assert "".join([c.choices[0].text async for c in stream]) == expected_text(3)


async def test_unknown_fields_pass_through(make_gateway: MakeGateway) -> None:
    up = FakeUpstream("a")
    gw = await make_gateway({"aws": [up]})
    await gw.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], extra_body={"top_k": 7, "min_tokens": 2}
    )
    assert up.requests[-1]["top_k"] == 7 and up.requests[-1]["min_tokens"] == 2


async def test_models_list(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"aws": [FakeUpstream("a")]})
    models = await gw.client().models.list()
    assert {m.id for m in models.data} == {"m", "alias-m"}


async def test_least_outstanding_spreads_concurrent_requests(make_gateway: MakeGateway) -> None:
    ups = [FakeUpstream(f"u{i}", tokens=4) for i in range(3)]
    for up in ups:
        up.token_delay = 0.02
    gw = await make_gateway({"aws": ups[:1], "gcp": ups[1:2], "azure": ups[2:]})
    client = gw.client()
    await asyncio.gather(
        *[
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], stream=False
            )
            for _ in range(30)
        ]
    )
    counts = [len(up.requests) for up in ups]
    assert sum(counts) == 30
    assert min(counts) >= 5, counts


async def test_connection_refused_retries_on_another_provider(make_gateway: MakeGateway) -> None:
    dead, alive = FakeUpstream("dead"), FakeUpstream("alive", tokens=2)
    gw = await make_gateway({"aws": [dead], "gcp": [alive]})
    await dead.stop()  # port now refuses connections
    for _ in range(4):
        raw = await gw.client().chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.parse().choices[0].message.content == expected_text(2)
        assert raw.headers["x-skyfabric-backend"].startswith("gcp/")


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', 400, "model"),
        (b'{"model": "m"}', 400, "messages"),
        (b'{"model": "m", "messages": [], "stream": "yes"}', 400, "messages"),
        (b'{"model": "m", "messages": [{"role": "user"}], "stream": "yes"}', 400, "stream"),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "Models: alias-m, m"),
    ],
)
async def test_bad_requests_get_clear_errors(
    make_gateway: MakeGateway, body: bytes, status: int, needle: str
) -> None:
    gw = await make_gateway({"aws": [FakeUpstream("a")]})
    async with httpx.AsyncClient() as http:
        resp = await http.post(f"{gw.base_url}/chat/completions", content=body)
        assert resp.status_code == status
        error = resp.json()["error"]
        assert needle in error["message"]
        assert set(error) == {"message", "type", "param", "code"}
        # the gateway is still up and answering
        ok = await http.post(
            f"{gw.base_url}/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
        )
        assert ok.status_code == 200


async def test_unknown_model_via_sdk_raises_not_found(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"aws": [FakeUpstream("a")]})
    with pytest.raises(openai.NotFoundError) as info:
        await gw.client().chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert "gpt-9" in str(info.value)


async def test_health_ready_metrics_and_unknown_route(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"aws": [FakeUpstream("a")]})
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{gw.root}/healthz")).status_code == 200
        ready = await http.get(f"{gw.root}/readyz")
        assert ready.status_code == 200 and ready.json()["endpoints_available"] == {"m": 1}
        await http.post(
            f"{gw.base_url}/chat/completions", json={"model": "m", "messages": [{"role": "user"}]}
        )
        metrics = (await http.get(f"{gw.root}/metrics")).text
        assert 'skyfabric_requests_total{model="m",status="200"} 1.0' in metrics
        missing = await http.get(f"{gw.root}/v2/nothing")
        assert missing.status_code == 404 and "error" in missing.json()
        wrong = await http.get(f"{gw.base_url}/chat/completions")
        assert wrong.status_code == 405


async def test_api_keys_are_enforced_when_configured(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"aws": [FakeUpstream("a")]}, api_keys=[{"key": "sk-test-key-0001"}])
    await gw.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    from openai import AsyncOpenAI

    bad = AsyncOpenAI(base_url=gw.base_url, api_key="sk-wrong-key-000", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
