"""Both official SDKs through the gateway to Azure OpenAI stand-ins (``tests/support/azure_standin.py``).

The stand-in speaks Azure's wire (routes, ``api-version``, ``api-key`` or an Entra token it issued itself,
the prompt-filter chunk, ``content_filter_results`` in every chunk, Azure's error shapes) and refuses any
field Azure does not know. Each test names the client protocol; streams cut on one Azure resource must end
on another exactly as an uninterrupted answer (replay: Azure continues no prefix).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import MakeGateway, RunningGateway
from tests.support.azure_standin import BLOCKED_WORD, UNDERLYING_MODEL, AzureStandIn, Issuer
from tests.support.counters import assert_released
from tests.support.tools import OPENAI_TOOLS, TOOLS


async def azure(
    make_gateway: MakeGateway, n: int = 1, *, shared_script: bool = True, **options: Any
) -> tuple[RunningGateway, list[AzureStandIn]]:
    """A gateway over ``n`` Azure resources, one provider each, one Entra tenant; faults queued on the
    first are served by whichever answers first (the others then answer whole)."""
    issuer = options.pop("issuer", None) or Issuer()
    ups = [AzureStandIn(f"azure-{i}", issuer=issuer, **options) for i in range(n)]
    if shared_script:
        for up in ups[1:]:
            up.script = ups[0].script
    providers = {f"az{i}": [up] for i, up in enumerate(ups)}
    gw = await make_gateway(providers, retry={"outage_wait": 0.5}, timeouts={"idle": 1.0, "first_byte": 2.0})
    return gw, ups


async def _openai_stream(client: Any, **kwargs: Any) -> tuple[str, str | None, list[Any]]:
    stream = await client.chat.completions.create(stream=True, **kwargs)
    text, reason, chunks = "", None, []
    async for chunk in stream:
        chunks.append(chunk)
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    return text, reason, chunks


async def _claude_stream(client: anthropic.AsyncAnthropic, **kwargs: Any) -> anthropic.types.Message:
    async with client.messages.stream(**kwargs) as stream:
        async for _ in stream:
            pass
        return await stream.get_final_message()


# -- OpenAI client (pass-through) ---------------------------------------------------------------------------


async def test_openai_sdk_on_the_deployment_route(make_gateway: MakeGateway) -> None:
    gw, (up,) = await azure(make_gateway)
    client = gw.client()
    messages = [{"role": "user", "content": "Hi"}]
    whole = await client.chat.completions.create(model="m", messages=messages, max_tokens=50, temperature=0)
    assert whole.choices[0].message.content == up.answer
    assert whole.choices[0].finish_reason == "stop"
    assert whole.model == UNDERLYING_MODEL and whole.usage is not None and whole.usage.completion_tokens == 12
    text, reason, chunks = await _openai_stream(
        client, model="m", messages=messages, max_tokens=50, stream_options={"include_usage": True}
    )
    assert text == up.answer and reason == "stop"
    # Azure's prompt-filter chunk reached the client as Azure sent it (no choices, its filter verdict)
    assert chunks[0].choices == [] and chunks[0].id == ""
    assert chunks[0].model_extra and "prompt_filter_results" in chunks[0].model_extra
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    for got in up.received:
        assert got.path == "/openai/deployments/gpt-4o-prod/chat/completions"
        assert got.query == {"api-version": "2024-10-21"}
        assert got.headers["api-key"] == up.resource_key and "authorization" not in got.headers
        assert got.body["model"] == "m"  # the client's bytes: the deployment route ignores the model
    await assert_released(gw.gateway.proxy)


async def test_openai_sdk_on_the_v1_route_names_the_deployment(make_gateway: MakeGateway) -> None:
    gw, (up,) = await azure(make_gateway, api_version="v1")
    client = gw.client()
    whole = await client.chat.completions.create(
        model="alias-m", messages=[{"role": "user", "content": "Hi"}]
    )
    assert whole.choices[0].message.content == up.answer
    text, _, _ = await _openai_stream(client, model="m", messages=[{"role": "user", "content": "Hi"}])
    assert text == up.answer
    assert [r.path for r in up.received] == ["/openai/v1/chat/completions"] * 2
    assert all(r.query == {} and r.body["model"] == "gpt-4o-prod" for r in up.received)


async def test_openai_sdk_tools_whole_and_streamed(make_gateway: MakeGateway) -> None:
    gw, _ = await azure(make_gateway)
    client = gw.client()
    messages = [{"role": "user", "content": "Call the tool for Paris"}]
    whole = await client.chat.completions.create(model="m", messages=messages, tools=OPENAI_TOOLS)
    call = whole.choices[0].message.tool_calls[0]
    assert whole.choices[0].finish_reason == "tool_calls"
    assert json.loads(call.function.arguments)["city"] == "Paris"
    stream = await client.chat.completions.create(
        model="m", messages=messages, tools=OPENAI_TOOLS, stream=True
    )
    arguments, ids, reason = "", set(), None
    async for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                arguments += delta.function.arguments or ""
                if delta.id:
                    ids.add(delta.id)
            reason = choice.finish_reason or reason
    assert json.loads(arguments) == json.loads(call.function.arguments) and len(ids) == 1
    assert reason == "tool_calls"


# -- Anthropic client (translated) --------------------------------------------------------------------------


async def test_anthropic_sdk_text_stream_and_tools(make_gateway: MakeGateway) -> None:
    gw, (up,) = await azure(make_gateway)
    client = gw.claude()
    kwargs: dict[str, Any] = {
        "model": "m",
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    whole = await client.messages.create(**kwargs, system="Be brief.")
    streamed = await _claude_stream(client, **kwargs)
    assert whole.content[0].text == streamed.content[0].text == up.answer
    assert whole.stop_reason == streamed.stop_reason == "end_turn"
    assert streamed.id and streamed.usage.output_tokens == whole.usage.output_tokens == 12
    sent = up.received[0].body
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["max_completion_tokens"] == 200 and "max_tokens" not in sent
    assert up.received[1].body["stream_options"] == {"include_usage": True}
    tooled = await _claude_stream(
        client,
        model="m",
        max_tokens=200,
        tools=TOOLS,
        messages=[{"role": "user", "content": "Call the tool for Oslo"}],
    )
    use = tooled.content[-1]
    assert use.type == "tool_use" and use.name == "get_weather" and use.input["city"] == "Oslo"
    assert tooled.stop_reason == "tool_use"
    answer = await client.messages.create(
        model="m",
        max_tokens=200,
        tools=TOOLS,
        messages=[
            {"role": "user", "content": "Call the tool for Oslo"},
            {"role": "assistant", "content": [use.model_dump(exclude_none=True)]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]},
        ],
    )
    assert answer.content[0].text == up.answer
    assert up.received[-1].body["messages"][-1]["role"] == "tool"
    await assert_released(gw.gateway.proxy)


# -- errors and the content filter, in each client's protocol --------------------------------------------


async def test_errors_map_for_both_clients(make_gateway: MakeGateway) -> None:
    gw, (up,) = await azure(make_gateway)
    client, messages = gw.client(), [{"role": "user", "content": "Hi"}]
    up.then("context_length")
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="m", messages=messages)
    assert caught.value.code == "context_length_exceeded"
    up.then("context_length")
    with pytest.raises(anthropic.BadRequestError) as refused:
        await gw.claude().messages.create(model="m", max_tokens=10, messages=messages)
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert "maximum context length" in refused.value.body["error"]["message"]
    up.then({"status": 400})
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="m", messages=messages)


async def test_prompt_blocked_by_the_content_filter(make_gateway: MakeGateway) -> None:
    gw, ups = await azure(make_gateway, 2)
    messages = [{"role": "user", "content": f"Tell me about {BLOCKED_WORD}"}]
    with pytest.raises(openai.BadRequestError) as caught:
        await gw.client().chat.completions.create(model="m", messages=messages)
    assert caught.value.status_code == 400 and caught.value.code == "content_filter"
    inner = caught.value.body["innererror"]  # Azure's own error, as Azure sent it
    assert inner["code"] == "ResponsibleAIPolicyViolation"
    assert inner["content_filter_result"]["violence"]["filtered"] is True
    with pytest.raises(anthropic.BadRequestError) as refused:
        await gw.claude().messages.create(model="m", max_tokens=10, messages=messages)
    assert refused.value.status_code == 400
    error = refused.value.body["error"]
    assert error["type"] == "invalid_request_error" and "content filter" in error["message"].lower()
    # the client's fault: asked once each, never retried on the other resource
    assert len(ups[0].received) + len(ups[1].received) == 2


async def test_completion_cut_by_the_content_filter(make_gateway: MakeGateway) -> None:
    gw, (up,) = await azure(make_gateway)
    messages = [{"role": "user", "content": "Hi"}]
    up.then({"filter_after": 5})
    text, reason, _ = await _openai_stream(gw.client(), model="m", messages=messages)
    assert reason == "content_filter" and text == "".join(f"t{i} " for i in range(5))
    up.then({"filter_after": 5})
    message = await _claude_stream(gw.claude(), model="m", max_tokens=100, messages=messages)
    assert message.stop_reason == "refusal" and message.content[0].text == text
    up.then({"filter_after": 5})
    whole = await gw.claude().messages.create(model="m", max_tokens=100, messages=messages)
    assert whole.stop_reason == "refusal"
    up.then({"filter_after": 5})
    plain = await gw.client().chat.completions.create(model="m", messages=messages)
    assert plain.choices[0].finish_reason == "content_filter"
    assert len(up.received) == 4  # a filtered answer is an answer: no retry, no continuation
    await assert_released(gw.gateway.proxy)


async def test_throttled_and_failing_resources_are_avoided(make_gateway: MakeGateway) -> None:
    gw, ups = await azure(make_gateway, 2)
    client, messages = gw.client(), [{"role": "user", "content": "Hi"}]
    ups[0].then({"status": 429, "retry_after_ms": 2500})
    answer = await client.chat.completions.with_raw_response.create(model="m", messages=messages)
    assert answer.parse().choices[0].message.content == ups[0].answer
    assert len(ups[0].received) + len(ups[1].received) == 2
    cooling = {p: until - gw.gateway.proxy.clock() for p, until in gw.gateway.proxy.cooldowns.items()}
    # cooled for retry-after-ms (2.5 s), not the coarser retry-after (3 s)
    assert len(cooling) == 1 and 2.0 < next(iter(cooling.values())) <= 2.5, cooling
    for fault in ({"status": 500}, {"status": 503}, {"status": 408}, "hang", "reset"):
        ups[0].then(fault)
        text, reason, _ = await _openai_stream(client, model="m", messages=messages)
        assert (text, reason) == (ups[0].answer, "stop"), fault
    await assert_released(gw.gateway.proxy)


# -- credentials -------------------------------------------------------------------------------------------


@pytest.mark.slow  # it lives through two token lifetimes (4.5 s)
async def test_entra_tokens_are_verified_and_refreshed_off_the_request_path(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    issuer = Issuer(token_lifetime=2.0)
    gw, (up,) = await azure(make_gateway, issuer=issuer, auth="entra")
    # the fleet's loading started the refresher: a token exists before any request
    for _ in range(100):
        if issuer.grants:
            break
        await asyncio.sleep(0.02)
    assert len(issuer.grants) == 1 and issuer.grants[0][1] == "secret"
    client = gw.client()
    started = time.monotonic()
    seen = 0
    while time.monotonic() - started < 4.5:  # past two token lifetimes
        answer = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
        assert answer.choices[0].message.content == up.answer
        message = await gw.claude().messages.create(
            model="m", max_tokens=50, messages=[{"role": "user", "content": "Hi"}]
        )
        assert message.content[0].text == up.answer
        seen += 2
        await asyncio.sleep(0.3)
    assert up.auth_failures == 0 and issuer.refusals == 0
    bearers = {r.headers["authorization"] for r in up.received}
    assert len(bearers) >= 3 and all(b.removeprefix("Bearer ") in issuer.issued for b in bearers)
    assert all("api-key" not in r.headers for r in up.received)
    # the refresher keeps going with no request at all
    before = len(issuer.grants)
    await asyncio.sleep(1.3)
    assert len(issuer.grants) > before
    tokens = list(issuer.issued)
    assert not any(token in caplog.text for token in tokens)
    assert issuer.client_secret not in caplog.text


async def test_bad_credentials_fail_over_and_never_leak(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    good = AzureStandIn("azure-good")
    wrong_key = AzureStandIn("azure-wrong-key", api_key="azure-key-wrong-000000000000000000")
    wrong_key.resource_key = "azure-key-the-resource-really-has-0000"
    issuer = Issuer(client_secret="entra-secret-the-tenant-knows")
    wrong_secret = AzureStandIn("azure-wrong-secret", issuer=issuer, auth="entra")
    secret_env = "SKYFABRIC_TEST_ENTRA_WRONG"
    monkeypatch.setenv(secret_env, "entra-secret-WRONG-0123456789")
    wrong_secret.pool = {"client_secret_env": secret_env}
    gw = await make_gateway({"a": [wrong_key], "b": [wrong_secret], "c": [good]})
    client = gw.client()
    for _ in range(20):  # ties are broken at random: go on until the wrong key has been tried
        answer = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
        assert answer.choices[0].message.content == good.answer
        if wrong_key.auth_failures:
            break
    assert wrong_key.auth_failures >= 1 and issuer.refusals >= 1
    # alone, a resource with a bad credential answers the client an error without any secret in it
    alone = await make_gateway({"a": [wrong_key]})
    with pytest.raises(openai.APIStatusError) as caught:
        await alone.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
    text = json.dumps(caught.value.body) + caplog.text
    for secret in (
        "azure-key-wrong-000000000000000000",
        "entra-secret-WRONG-0123456789",
        issuer.client_secret,
    ):
        assert secret not in text
    assert "AADSTS7000215" in caplog.text  # the token endpoint's refusal is logged, by its code


# -- a stream cut on one Azure resource ends on another, exactly ---------------------------------------------


@pytest.mark.parametrize("fault", [{"cut_after": 5}, {"hang_after": 4}])
async def test_stream_cut_on_azure_is_replayed_on_another(
    make_gateway: MakeGateway, fault: dict[str, int]
) -> None:
    gw, ups = await azure(make_gateway, 3, tokens=20)  # each cut ejects one: the second needs a third
    messages = [{"role": "user", "content": "Hi"}]
    ups[0].then(fault)
    text, reason, chunks = await _openai_stream(gw.client(), model="m", messages=messages, temperature=0)
    assert (text, reason) == (ups[0].answer, "stop")
    assert len({c.id for c in chunks if c.id}) == 1  # one answer, though two resources wrote it
    ups[0].then(fault)
    message = await _claude_stream(
        gw.claude(), model="m", max_tokens=100, extra_body={"temperature": 0}, messages=messages
    )
    assert message.content[0].text == ups[0].answer and message.stop_reason == "end_turn"
    assert max(up.sent_tokens[0] for up in ups if up.sent_tokens) >= 4
    await assert_released(gw.gateway.proxy)


async def test_tool_call_cut_mid_arguments_is_replayed_exactly(make_gateway: MakeGateway) -> None:
    gw, ups = await azure(make_gateway, 3)
    messages = [{"role": "user", "content": "Call the tool for Lima"}]
    ups[0].then({"cut_after": 3})
    stream = await gw.client().chat.completions.create(
        model="m", messages=messages, tools=OPENAI_TOOLS, stream=True, temperature=0
    )
    arguments, ids = "", []
    async for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                assert delta.index == 0
                arguments += delta.function.arguments or ""
                if delta.id:
                    ids.append(delta.id)
    assert json.loads(arguments) == {"city": "Lima", "days": 3, "note": 'say "hi" — ok'}
    assert len(ids) == 1  # the replay's own id is dropped: the client keeps the one it has
    ups[0].then({"cut_after": 3})
    message = await _claude_stream(
        gw.claude(),
        model="m",
        max_tokens=100,
        extra_body={"temperature": 0},
        tools=TOOLS,
        messages=messages,
    )
    assert [b.type for b in message.content] == ["tool_use"]
    assert message.content[0].input == {"city": "Lima", "days": 3, "note": 'say "hi" — ok'}
    await assert_released(gw.gateway.proxy)
