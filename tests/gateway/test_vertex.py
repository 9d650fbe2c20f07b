"""Vertex AI through the gateway, end to end with both official SDKs, both publishers (Claude, Gemini).

The Vertex stand-in (``tests/support/vertex_standin.py``) checks the OAuth bearer on every call; the gateway
gets its tokens from the stand-in's token endpoint by google-auth's real JWT-bearer exchange (a service
account key generated for the test). Each test names the client protocol and the publisher it reaches.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import MakeGateway, RunningGateway
from tests.support.anthropic_standin import StandIn
from tests.support.counters import assert_released
from tests.support.tools import OPENAI_TOOLS, TOOLS
from tests.support.vertex_standin import VertexStandIn

PUBLISHERS = ["anthropic", "google"]


async def vertex(tmp_path: Path, publisher: str, name: str = "", **options: Any) -> VertexStandIn:
    """A started Vertex stand-in whose pool's credentials are a service account it trusts."""
    up = VertexStandIn(name or f"vertex-{publisher}", publisher=publisher, **options)
    await up.start()
    up.service_account_file(tmp_path)
    return up


async def gateway(
    make_gateway: MakeGateway, tmp_path: Path, publisher: str, n: int = 1, **options: Any
) -> tuple[RunningGateway, list[VertexStandIn]]:
    ups = [await vertex(tmp_path, publisher, f"vertex-{publisher}-{i}", **options) for i in range(n)]
    gw = await make_gateway({f"gcp{i}": [up] for i, up in enumerate(ups)}, retry={"outage_wait": 0.3})
    return gw, ups


async def _stream_message(client: anthropic.AsyncAnthropic, **kwargs: Any) -> anthropic.types.Message:
    async with client.messages.stream(**kwargs) as stream:
        async for _ in stream:
            pass
        return await stream.get_final_message()


async def _stream_chat(client: openai.AsyncOpenAI, **kwargs: Any) -> tuple[str, Any, str | None, list[Any]]:
    """(text, usage, finish_reason, tool call deltas) of a streamed chat completion."""
    stream = await client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs
    )
    text, usage, finish, calls = "", None, None, []
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            calls.extend(choice.delta.tool_calls or [])
            finish = choice.finish_reason or finish
    return text, usage, finish, calls


# -- text, streamed and whole ---------------------------------------------------------------------------


@pytest.mark.parametrize("publisher", PUBLISHERS)
async def test_openai_sdk_to_vertex(make_gateway: MakeGateway, tmp_path: Path, publisher: str) -> None:
    gw, (up,) = await gateway(make_gateway, tmp_path, publisher)
    client = gw.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    whole = await client.chat.completions.create(model="m", messages=messages, max_tokens=200)
    choice = whole.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content
    assert choice.message.content == up.requests[-1].sent_text
    assert whole.usage is not None and whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens > 0
    text, usage, finish, _ = await _stream_chat(client, model="m", messages=messages, max_tokens=200)
    assert text == choice.message.content and finish == "stop"
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    sent = up.requests[-1]
    assert sent.headers["authorization"].startswith("Bearer ya29.")
    if publisher == "google":
        assert sent.path.endswith(":streamGenerateContent") and sent.query == "alt=sse"
        assert sent.body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    else:
        assert sent.path.endswith(":streamRawPredict") and sent.body["system"]
    assert up.unauthenticated == 0
    await assert_released(gw.gateway.proxy)


@pytest.mark.parametrize("publisher", PUBLISHERS)
async def test_anthropic_sdk_to_vertex(make_gateway: MakeGateway, tmp_path: Path, publisher: str) -> None:
    gw, (up,) = await gateway(make_gateway, tmp_path, publisher)
    client = gw.claude()
    kwargs: dict[str, Any] = {
        "model": "m",
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    whole = await client.messages.create(**kwargs)
    streamed = await _stream_message(client, **kwargs)
    assert whole.content[0].text == streamed.content[0].text == up.requests[-1].sent_text != ""
    assert whole.stop_reason == streamed.stop_reason == "end_turn"
    assert streamed.usage.output_tokens == whole.usage.output_tokens > 0
    counted = await client.messages.count_tokens(model="m", messages=kwargs["messages"])
    assert counted.input_tokens > 0
    await assert_released(gw.gateway.proxy)


# -- tools --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("publisher", PUBLISHERS)
async def test_tools_round_trip_through_both_sdks(
    make_gateway: MakeGateway, tmp_path: Path, publisher: str
) -> None:
    gw, (up,) = await gateway(make_gateway, tmp_path, publisher)
    client = gw.client()
    asked = [{"role": "user", "content": "weather in Oslo?"}]
    called = await client.chat.completions.create(
        model="m", messages=asked, tools=OPENAI_TOOLS, tool_choice="required", max_tokens=200
    )
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and isinstance(arguments["city"], str)
    _, _, finish, deltas = await _stream_chat(
        client, model="m", messages=asked, tools=OPENAI_TOOLS, tool_choice="required", max_tokens=200
    )
    assert finish == "tool_calls"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == arguments
    # the result goes back (as Gemini's functionResponse, named by the call) and the model answers in text
    answered = await client.chat.completions.create(
        model="m",
        messages=[
            *asked,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
            {"role": "tool", "tool_call_id": call.id, "content": "rain, 4°C"},
        ],
        tools=OPENAI_TOOLS,
        max_tokens=200,
    )
    assert answered.choices[0].finish_reason == "stop" and answered.choices[0].message.content
    if publisher == "google":
        turn = up.requests[-1].body["contents"][-1]
        assert turn["parts"][0]["functionResponse"]["name"] == "get_weather"
    message = await _stream_message(
        gw.claude(),
        model="m",
        max_tokens=200,
        tools=TOOLS,
        tool_choice={"type": "any"},
        messages=[{"role": "user", "content": "Call the tool for Paris"}],
    )
    assert message.stop_reason == "tool_use"
    block = message.content[-1]
    assert block.type == "tool_use" and block.name == "get_weather" and isinstance(block.input["city"], str)
    await assert_released(gw.gateway.proxy)


# -- errors and safety ------------------------------------------------------------------------------------


@pytest.mark.parametrize("publisher", PUBLISHERS)
async def test_vertex_errors_reach_both_sdks_as_their_own(
    make_gateway: MakeGateway, tmp_path: Path, publisher: str
) -> None:
    gw, ups = await gateway(make_gateway, tmp_path, publisher, n=2)
    for up in ups[1:]:
        up.script = ups[0].script  # a fault is served by whichever answers first
    client, messages = gw.client(), [{"role": "user", "content": "Hi"}]

    # 503 UNAVAILABLE and 500 INTERNAL: tried on the other endpoint, the client sees an answer
    def answered(status: int) -> int:
        return sum(r.status == status for up in ups for r in up.requests)

    for status in (503, 500):
        ups[0].then({"status": status})
        ok = await client.chat.completions.create(model="m", messages=messages, max_tokens=30)
        assert ok.choices[0].message.content
        assert answered(status) == 1
    # 400 INVALID_ARGUMENT: the client's fault, in each client's shape
    ups[0].then({"status": 400, "message": 'Invalid JSON payload received. Unknown name "x"'})
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="m", messages=messages, max_tokens=30)
    ups[0].then({"status": 400, "message": 'Invalid JSON payload received. Unknown name "x"'})
    with pytest.raises(anthropic.BadRequestError):
        await gw.claude().messages.create(model="m", max_tokens=30, messages=messages)
    # a prompt too long for the model: a 400 the client understands (no larger model is declared)
    ups[0].then({"prompt_too_long": True})
    with pytest.raises(openai.BadRequestError) as too_long:
        await client.chat.completions.create(model="m", messages=messages, max_tokens=30)
    assert "token" in str(too_long.value).lower()
    # 429 RESOURCE_EXHAUSTED everywhere: the client is told to come back later
    ups[0].then({"status": 429}, {"status": 429})
    with pytest.raises(anthropic.RateLimitError):
        await gw.claude().messages.create(model="m", max_tokens=30, messages=messages)
    assert all(up.unauthenticated == 0 for up in ups)
    await assert_released(gw.gateway.proxy)


async def test_a_gemini_safety_stop_is_a_finish_reason_each_client_understands(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    gw, (up,) = await gateway(make_gateway, tmp_path, "google")
    client, messages = gw.client(), [{"role": "user", "content": "Hi"}]
    up.then({"safety_after": 2})
    text, _, finish, _ = await _stream_chat(client, model="m", messages=messages, max_tokens=200)
    assert finish == "content_filter" and text == up.requests[-1].sent_text != ""
    up.then({"safety_after": 2})
    message = await _stream_message(gw.claude(), model="m", max_tokens=200, messages=messages)
    assert message.stop_reason == "refusal"
    # a prompt blocked outright: an empty answer that says why
    up.then("blocked")
    blocked = await client.chat.completions.create(model="m", messages=messages, max_tokens=200)
    assert blocked.choices[0].finish_reason == "content_filter" and not blocked.choices[0].message.content
    up.then("blocked")
    refused = await gw.claude().messages.create(model="m", max_tokens=200, messages=messages)
    assert refused.stop_reason == "refusal" and refused.content == []
    await assert_released(gw.gateway.proxy)


# -- tokens --------------------------------------------------------------------------------------------------


async def test_tokens_are_refreshed_in_the_background_never_on_the_request_path(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    # Tokens live 3 s and the token endpoint takes 0.8 s to answer: a request that waited on an exchange
    # would take 0.8 s; one sent with an expired token would meet a 401.
    gw, (up,) = await gateway(make_gateway, tmp_path, "google", token_lifetime=3.0, token_delay=0.8)
    client = gw.client()
    backend = gw.gateway.proxy.backends["vertex"]
    source = next(iter(backend.tokens.sources.values()))  # type: ignore[attr-defined]
    slowest, ends = 0.0, time.monotonic() + 4.5
    while time.monotonic() < ends:
        began = time.monotonic()
        ok = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=5
        )
        slowest = max(slowest, time.monotonic() - began)
        assert ok.choices[0].message.content
        await asyncio.sleep(0.05)
    assert len(up.token_requests) >= 3 and source.refreshes >= 3  # at start, then every ~1.5 s
    assert up.unauthenticated == 0 and source.expired_reads == 0
    assert slowest < 0.6, f"a request took {slowest:.2f}s: it waited on a token exchange"
    used = {r.headers["authorization"] for r in up.requests if r.path.startswith("/v1/projects")}
    assert len(used) >= 2  # requests moved to the new tokens as they came
    await assert_released(gw.gateway.proxy)


async def test_credentials_never_reach_logs_or_clients(
    make_gateway: MakeGateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gw, (up,) = await gateway(make_gateway, tmp_path, "google")
    client = gw.client()
    assert await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
    backend = gw.gateway.proxy.backends["vertex"]
    source = next(iter(backend.tokens.sources.values()))  # type: ignore[attr-defined]
    # The token endpoint stops trusting the key: the refresh fails (logged), the old token still serves.
    up.accounts.clear()
    assert not await source.refresh()
    assert source.failures == 1 and "invalid_grant" in (source.last_error or "")
    # The tokens expire: requests meet 401 there, and the client sees an error that carries no secret.
    for token in up.issued.values():
        token.expires_at = 0.0
    with pytest.raises(openai.APIStatusError) as failed:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
    assert failed.value.status_code in (502, 503)
    assert up.unauthenticated >= 1
    key = json.loads(up.credentials_path.read_bytes() if up.credentials_path else b"{}")["private_key"]
    secrets = [*up.issued, key.splitlines()[1], "eyJ"]
    visible = caplog.text + str(failed.value.body) + repr(gw.gateway.endpoints)
    assert "could not refresh the access token" in caplog.text
    for secret in secrets:
        assert secret not in visible
    await assert_released(gw.gateway.proxy)


async def test_a_credential_source_that_does_not_exist_stops_the_start(make_gateway: MakeGateway) -> None:
    up = VertexStandIn("vertex-nocreds", publisher="google")
    await up.start()
    up.credentials_path = Path("/nonexistent/sa.json")
    with pytest.raises(Exception, match="vertex credentials"):
        await make_gateway({"gcp": [up]})
    await up.stop()


async def test_credentials_env_and_application_default_credentials_are_honoured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from skyfabric.core.errors import ConfigError
    from skyfabric.core.vertex_settings import VertexSettings
    from skyfabric.protocols.backends.vertex_auth import Tokens

    up = await vertex(tmp_path, "google")
    path = str(up.credentials_path)
    try:
        via_env = VertexSettings(
            project="p", location="us-east5", publisher="google", credentials_env="SA_PATH"
        )
        with pytest.raises(ConfigError, match="SA_PATH is not set"):
            await Tokens().start([via_env])
        monkeypatch.setenv("SA_PATH", path)
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", path)
        adc = VertexSettings(project="p", location="us-east5", publisher="google")
        tokens = Tokens()
        await tokens.start([via_env, adc])
        try:
            for settings in (via_env, adc):
                source = tokens.source(settings)
                assert source is not None and source.token in up.issued
        finally:
            await tokens.close()
        assert len(up.token_requests) == 2
    finally:
        await up.stop()


# -- one Claude stream across vendors ------------------------------------------------------------------------


@pytest.mark.parametrize("client_kind", ["openai", "anthropic"])
async def test_a_claude_stream_cut_on_vertex_finishes_on_anthropic_identically(
    make_gateway: MakeGateway, tmp_path: Path, client_kind: str
) -> None:
    vtx = await vertex(tmp_path, "anthropic", delta_delay=0.005)
    ant = StandIn("anthropic", delta_delay=0.005)
    ant.model = "claude-sonnet-4-5-20250929"  # the same model as Vertex's claude-sonnet-4-5@20250929
    ant.script = vtx.script  # one fault script: the first to answer is cut, the other continues
    gw = await make_gateway(
        {"gcp": [vtx], "anthropic": [ant]},
        retry={"outage_wait": 0.3},
        # a cut ejects its endpoint: readmit it quickly, so the next round has both vendors again
        health={"base_ejection": 0.1, "probe_interval": 0.05, "slow_start": 0},
    )
    proxy = gw.gateway.proxy
    prompt = [{"role": "user", "content": "Write some code"}]

    async def ask() -> str:
        if client_kind == "openai":
            # no token limit and no usage asked: the relay may continue by prefill (Anthropic's stream says
            # its token count only at the end, so under a limit it replays: the Anthropic client's case)
            stream = await gw.client().chat.completions.create(model="m", messages=prompt, stream=True)
            text, finish = "", None
            async for chunk in stream:
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    finish = choice.finish_reason or finish
            assert finish == "stop"
            return text
        message = await _stream_message(gw.claude(), model="m", max_tokens=300, messages=prompt)
        assert message.stop_reason == "end_turn"
        return "".join(b.text for b in message.content if b.type == "text")

    expected = await ask()
    assert expected
    directions = set()
    for _ in range(12):  # the balancer picks the first vendor; both directions are checked
        while not all(s.available(proxy.clock()) for s in proxy.states.values()):
            await asyncio.sleep(0.02)
        vtx.then({"cut_after": 3})
        assert await ask() == expected
        cut = next(
            r for r in [*vtx.requests, *ant.requests] if r.fault == {"cut_after": 3} and not r.completed
        )
        cut.fault = "seen"
        directions.add("vertex→anthropic" if cut in vtx.requests else "anthropic→vertex")
        if directions == {"vertex→anthropic", "anthropic→vertex"}:
            break
    assert "vertex→anthropic" in directions
    # the continuation on the other vendor: a prefill of what the client had (OpenAI client), or a replay
    continued = [
        r for r in [*vtx.requests, *ant.requests] if r.completed and r.body and r.body.get("messages")
    ]
    prefilled = [r for r in continued if r.body["messages"][-1]["role"] == "assistant"]
    assert bool(prefilled) is (client_kind == "openai")
    assert all(expected.startswith(r.body["messages"][-1]["content"]) for r in prefilled)
    assert vtx.unauthenticated == 0
    await assert_released(gw.gateway.proxy)
