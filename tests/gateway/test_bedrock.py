"""Both official SDKs through the gateway to Amazon Bedrock's runtime (the stand-in), end to end.

The Bedrock stand-in (``tests/support/bedrock_standin.py``) verifies every request's SigV4 signature with
its own secret, speaks Converse and InvokeModel with event-stream frames that carry real CRCs, and answers
the same conversation with the same words as the Anthropic stand-in, so a stream cut on Bedrock must finish
on Anthropic's API with exactly the uninterrupted answer. Credentials reach the gateway only through the
standard AWS chain: environment variables or a shared credentials file, set here per test.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import MakeGateway
from tests.support.anthropic_answer import verify_thinking
from tests.support.anthropic_standin import StandIn
from tests.support.aws_env import clean_aws_env
from tests.support.bedrock_standin import ACCESS_KEY, SECRET_KEY, BedrockStandIn
from tests.support.counters import assert_released
from tests.support.tools import OPENAI_TOOLS, TOOLS


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A clean AWS environment: no host files, no metadata service; the stand-in's keys in the env."""
    return clean_aws_env(monkeypatch, tmp_path)


async def _stream(client: anthropic.AsyncAnthropic, **kwargs: Any) -> anthropic.types.Message:
    async with client.messages.stream(**kwargs) as stream:
        async for _ in stream:
            pass
        return await stream.get_final_message()


async def _openai_text(client: Any, **kwargs: Any) -> tuple[str, Any]:
    text, usage = "", None
    async for chunk in await client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    return text, usage


# -- both SDKs, both Bedrock APIs -------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["converse", "invoke"])
async def test_openai_client_to_bedrock(make_gateway: MakeGateway, aws: Path, api: str) -> None:
    up = BedrockStandIn(api=api)
    gw = await make_gateway({"aws": [up]})
    client = gw.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    whole = await client.chat.completions.create(model="m", messages=messages, max_tokens=200)
    assert whole.choices[0].finish_reason == "stop"
    assert whole.choices[0].message.content
    assert whole.usage is not None and whole.usage.completion_tokens > 0
    text, usage = await _openai_text(
        client, model="m", messages=messages, max_tokens=200, stream_options={"include_usage": True}
    )
    assert text == whole.choices[0].message.content
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    paths = [r.path for r in up.messages]
    suffixes = (
        ("converse", "converse-stream") if api == "converse" else ("invoke", "invoke-with-response-stream")
    )
    assert paths == [f"/model/{up.model.replace(':', '%3A')}/{s}" for s in suffixes]
    sent = up.messages[-1].body
    if api == "converse":
        assert sent["system"] == [{"text": "Be brief."}] and sent["inferenceConfig"]["maxTokens"] == 200
    else:
        assert sent["anthropic_version"] == "bedrock-2023-05-31" and "model" not in sent
    # tools: a toolUse comes back as OpenAI tool_calls, its result goes back as a toolResult
    called = await client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "weather?"}],
        tools=OPENAI_TOOLS,
        tool_choice="required",
        max_tokens=200,
    )
    call = called.choices[0].message.tool_calls[0]
    assert called.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    followed = await client.chat.completions.create(
        model="m",
        messages=[
            {"role": "user", "content": "weather?"},
            called.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ],
        tools=OPENAI_TOOLS,
        max_tokens=200,
    )
    assert followed.choices[0].finish_reason == "stop"
    await assert_released(gw.gateway.proxy)
    await up.wait_idle(connections=False)


@pytest.mark.parametrize("api", ["converse", "invoke"])
async def test_anthropic_client_to_bedrock(make_gateway: MakeGateway, aws: Path, api: str) -> None:
    up = BedrockStandIn(api=api)
    gw = await make_gateway({"aws": [up]})
    client = gw.claude()
    kwargs: dict[str, Any] = {
        "model": "m",
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    whole = await client.messages.create(**kwargs)
    streamed = await _stream(client, **kwargs)
    assert whole.content[0].text == streamed.content[0].text != ""
    assert whole.stop_reason == streamed.stop_reason == "end_turn"
    assert streamed.usage.output_tokens == whole.usage.output_tokens > 0
    # tools and thinking, streamed: Bedrock's reasoningContent / Anthropic's thinking, signed
    message = await _stream(
        client,
        model="m",
        max_tokens=3000,
        thinking={"type": "enabled", "budget_tokens": 1024},
        tools=TOOLS,
        messages=[{"role": "user", "content": "Call the tool for Paris"}],
    )
    kinds = [b.type for b in message.content]
    assert kinds[0] == "thinking" and kinds[-1] == "tool_use", kinds
    assert verify_thinking(message.content[0].thinking, message.content[0].signature)
    assert message.stop_reason == "tool_use"
    assert isinstance(message.content[-1].input, dict) and message.content[-1].input
    await assert_released(gw.gateway.proxy)


async def test_cross_region_inference_profile_is_the_model_id_in_the_path(
    make_gateway: MakeGateway, aws: Path
) -> None:
    profile = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
    up = BedrockStandIn(inference_profile=profile)
    gw = await make_gateway({"aws": [up]})
    answer = await gw.claude().messages.create(
        model="m", max_tokens=50, messages=[{"role": "user", "content": "Hi"}]
    )
    assert answer.content[0].text
    assert up.messages[-1].path == "/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/converse"


# -- errors --------------------------------------------------------------------------------------------------


async def test_errors_reach_both_sdks_in_their_shapes(make_gateway: MakeGateway, aws: Path) -> None:
    up = BedrockStandIn()
    gw = await make_gateway({"aws": [up]}, retry={"outage_wait": 0.2})
    client, messages = gw.client(), [{"role": "user", "content": "x"}]
    up.set_fault({"status": 429}, times=5)  # ThrottlingException: the client is told to come back
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(model="m", messages=messages, max_tokens=5)
    assert limited.value.response.headers.get("retry-after")
    assert up.messages[-1].status == 429
    up.set_fault(None)
    gw.gateway.proxy.cooldowns.clear()
    up.set_fault({"status": 503}, times=5)  # ServiceUnavailableException: overloaded
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        await gw.claude().messages.create(model="m", max_tokens=5, messages=messages)
    assert overloaded.value.status_code in (502, 503, 529)
    up.set_fault(None)
    # a ValidationException is the client's: answered in its protocol, not retried
    before = len(up.messages)
    up.set_fault({"status": 400, "message": "messages.0: bad request"}, times=1)
    with pytest.raises(anthropic.BadRequestError) as bad:
        await gw.claude().messages.create(model="m", max_tokens=5, messages=messages)
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    assert len(up.messages) == before + 1
    # an exception frame mid-stream (throttlingException) with nowhere to continue: an in-band error
    up.set_fault({"error_after": 2}, times=1)
    with pytest.raises(openai.APIError):
        await _openai_text(client, model="m", messages=messages, max_tokens=100)
    await assert_released(gw.gateway.proxy)


# -- SigV4 and the credential chain ---------------------------------------------------------------------


async def test_a_wrong_secret_is_refused_and_never_shown(
    make_gateway: MakeGateway, aws: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wrong/secret/KEY/that-must-never-be-printed"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    up = BedrockStandIn()
    gw = await make_gateway({"aws": [up]}, retry={"outage_wait": 0.2})
    caplog.set_level(logging.DEBUG)
    with pytest.raises(openai.APIStatusError) as err:
        await gw.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], max_tokens=5
        )
    assert up.refusals and up.refusals[0].status == 403
    assert up.refusals[0].headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/")
    shown = err.value.response.text + caplog.text
    assert wrong not in shown and SECRET_KEY not in shown
    await assert_released(gw.gateway.proxy)


async def test_session_credentials_from_the_environment(
    make_gateway: MakeGateway, aws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEStandInSessionToken==")
    up = BedrockStandIn(session_token="FwoGZXIvYXdzEStandInSessionToken==")
    gw = await make_gateway({"aws": [up]})
    answer = await gw.claude().messages.create(
        model="m", max_tokens=20, messages=[{"role": "user", "content": "Hi"}]
    )
    assert answer.content[0].text
    assert up.messages[-1].headers["x-amz-security-token"] == "FwoGZXIvYXdzEStandInSessionToken=="


async def test_credentials_from_a_shared_profile_file(
    make_gateway: MakeGateway, aws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    (aws / "credentials").write_text(
        f"[default]\naws_access_key_id = AKIAWRONGDEFAULT0000\naws_secret_access_key = nope\n\n"
        f"[bedrock-prod]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    up = BedrockStandIn(profile="bedrock-prod")  # the pool names the profile: only its keys sign
    gw = await make_gateway({"aws": [up]})
    answer = await gw.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=20
    )
    assert answer.choices[0].message.content
    assert not up.refusals


# -- a stream cut on Bedrock finishes on Anthropic's API ---------------------------------------------------


@pytest.mark.parametrize("api", ["converse", "invoke"])
@pytest.mark.parametrize(
    "fault",
    [
        {"cut_after": 3},
        {"cut_in": "text"},
        {"hang_after": 3},
        {"error_after": 3},  # a throttlingException frame
        {"error_after": 2, "exception": "modelStreamErrorException"},
        {"bad_crc_after": 3},
    ],
)
async def test_a_stream_cut_on_bedrock_finishes_on_anthropic_identically(
    make_gateway: MakeGateway, aws: Path, api: str, fault: dict[str, Any]
) -> None:
    bedrock = BedrockStandIn(api=api, delta_delay=0.002)
    vendor = StandIn("anthropic", delta_delay=0.002)
    gw = await make_gateway(
        {"aws": [bedrock], "anthropic": [vendor]}, retry={"outage_wait": 0.5}, timeouts={"idle": 0.5}
    )
    client = gw.claude()
    kwargs: dict[str, Any] = {
        "model": "m",
        "max_tokens": 300,
        "extra_body": {"temperature": 0},
        "messages": [{"role": "user", "content": "Write some code"}],
    }
    expected = await _stream(client, **kwargs)
    proxy = gw.gateway.proxy
    on_bedrock, on_vendor = proxy.states["aws/r1/pool/0"], proxy.states["anthropic/r1/pool/0"]
    assert on_bedrock.available(proxy.clock()), f"Bedrock was ejected before the cut: {on_bedrock}"
    bedrock.set_fault(fault, times=1)
    on_vendor.outstanding += 1000  # the stream goes to Bedrock (least loaded), its continuation here
    try:
        got = await _stream(client, **kwargs)
    finally:
        on_vendor.outstanding -= 1000
    assert got.content[0].text == expected.content[0].text
    assert got.stop_reason == expected.stop_reason
    assert got.usage.output_tokens == expected.usage.output_tokens
    assert not bedrock.script, "Bedrock never served the cut"
    cut = next(r for r in bedrock.messages if r.fault == fault)
    assert cut.sent_text and not cut.completed
    assert vendor.messages[-1].completed
    await assert_released(gw.gateway.proxy)


@pytest.mark.parametrize(
    "fault",
    [
        {"status": 429},
        {"status": 503},
        {"status": 429, "error": "ModelNotReadyException"},
        {"status": 500},
        "reset",
    ],
)
async def test_bedrock_refusing_before_the_answer_is_retried_on_anthropic(
    make_gateway: MakeGateway, aws: Path, fault: Any
) -> None:
    bedrock, vendor = BedrockStandIn(), StandIn("anthropic")
    gw = await make_gateway({"aws": [bedrock], "anthropic": [vendor]}, retry={"outage_wait": 0.5})
    client = gw.client()
    messages = [{"role": "user", "content": "Write some code"}]
    expected, _ = await _openai_text(client, model="m", messages=messages, max_tokens=100, temperature=0)
    bedrock.set_fault(fault)  # every Bedrock request from now
    for _ in range(6):  # zero client-visible errors, whichever vendor is picked first
        text, _ = await _openai_text(client, model="m", messages=messages, max_tokens=100, temperature=0)
        assert text == expected
    assert any(r.fault == fault for r in bedrock.messages)
    await assert_released(gw.gateway.proxy)
