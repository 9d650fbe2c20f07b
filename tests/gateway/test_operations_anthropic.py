"""Keys, limits and the ledger on the Anthropic front door (``/v1/messages``), with Anthropic's SDK.

The key comes as ``x-api-key``; refusals (403, 429) are Anthropic's error shape; the rate-limit headers
are ``anthropic-ratelimit-*``; the ledger records the client's protocol and the backend's own usage,
cache reads included in the prompt (the seam's convention).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.conftest import MakeGateway, RunningGateway
from tests.support.anthropic_standin import StandIn
from tests.support.counters import assert_released
from tests.support.fake_upstream import FakeUpstream, count_tokens

ADMIN = "admin-credential-for-tests-0002"
HI = [{"role": "user", "content": "Hi"}]


async def gateway(
    make_gateway: MakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, up: Any
) -> RunningGateway:
    monkeypatch.setenv("SF_TEST_ADMIN2", ADMIN)
    return await make_gateway(
        {"p0": [up]},
        models=[
            {
                "name": getattr(up, "fleet_model", None) or "m",
                "price_per_mtok_in": 3.0,
                "price_per_mtok_out": 15.0,
            }
        ],
        operations={
            "database": str(tmp_path / "ops.db"),
            "admin_key_env": "SF_TEST_ADMIN2",
            "ledger": {"enabled": True, "ship_interval": 0.01},
        },
    )


async def new_key(gw: RunningGateway, **limits: Any) -> tuple[str, str]:
    async with httpx.AsyncClient(base_url=gw.root, headers={"authorization": f"Bearer {ADMIN}"}) as http:
        made = (await http.post("/admin/keys", json={"name": "team", **limits})).json()
    return made["key"], made["id"]


async def ledger_row(path: Path, request_id: str, within: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            db.row_factory = sqlite3.Row
            try:
                row = db.execute(
                    "SELECT * FROM skyfabric_usage WHERE request_id = ? AND final = 1", (request_id,)
                ).fetchone()
            finally:
                db.close()
            if row is not None:
                return dict(row)
        except sqlite3.OperationalError:
            pass
        await asyncio.sleep(0.02)
    raise AssertionError(f"no final ledger row for {request_id}")


async def test_an_anthropic_client_is_limited_and_refused_in_its_own_protocol(
    make_gateway: MakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = StandIn("standin-0")
    gw = await gateway(make_gateway, tmp_path, monkeypatch, up)
    model = up.fleet_model
    key, key_id = await new_key(gw, rpm=2, models=[model])
    client = anthropic.AsyncAnthropic(base_url=gw.root, api_key=key, max_retries=0)  # sends x-api-key

    raw = await client.messages.with_raw_response.create(model=model, max_tokens=50, messages=HI)
    message = await raw.parse()
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "2"
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "1"
    assert "x-ratelimit-limit-requests" not in raw.headers
    row = await ledger_row(tmp_path / "ops.db", raw.headers["x-request-id"])
    assert (row["protocol"], row["key_id"], row["outcome"]) == ("anthropic.messages", key_id, "ok")
    usage = message.usage
    prompt = (
        usage.input_tokens + (usage.cache_read_input_tokens or 0) + (usage.cache_creation_input_tokens or 0)
    )
    assert (row["tokens_in"], row["tokens_out"]) == (prompt, usage.output_tokens)
    assert row["cost"] == pytest.approx((prompt * 3.0 + usage.output_tokens * 15.0) / 1e6)

    async with client.messages.stream(model=model, max_tokens=50, messages=HI) as stream:
        async for _ in stream:
            pass
    with pytest.raises(anthropic.RateLimitError) as refused:
        await client.messages.create(model=model, max_tokens=50, messages=HI)
    error = refused.value
    assert error.body["type"] == "error" and error.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    headers = error.response.headers
    assert int(headers["retry-after"]) == 30 and headers["anthropic-ratelimit-requests-remaining"] == "0"

    other, _ = await new_key(gw, models=["nothing-*"])
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        await anthropic.AsyncAnthropic(base_url=gw.root, api_key=other, max_retries=0).messages.create(
            model=model, max_tokens=5, messages=HI
        )
    assert denied.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    with pytest.raises(anthropic.AuthenticationError):
        await anthropic.AsyncAnthropic(base_url=gw.root, api_key="sk-nope", max_retries=0).messages.create(
            model=model, max_tokens=5, messages=HI
        )
    await assert_released(gw.gateway.proxy)


async def test_a_continued_stream_costs_each_part_at_its_own_backend(
    make_gateway: MakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OpenAI stream cut on one pool and continued on another: the client's tokens are one answer's,
    the cost is each backend's own usage (the continuation paid for its prefilled prompt too)."""
    monkeypatch.setenv("SF_TEST_ADMIN2", ADMIN)
    aws = FakeUpstream("a", tokens=12).then({"cut_after": 5})
    gcp = FakeUpstream("b", tokens=12)
    gw = await make_gateway(
        {"aws": [aws], "gcp": [gcp]},
        models=[{"name": "m", "price_per_mtok_in": 1.0, "price_per_mtok_out": 2.0}],
        health={"probe_interval": 0},
        operations={"database": str(tmp_path / "ops.db"), "admin_key_env": "SF_TEST_ADMIN2",
                    "ledger": {"enabled": True, "ship_interval": 0.01}},
    )  # fmt: skip
    gw.gateway.proxy.states["gcp/r1/pool/0"].reported_waiting = 1000  # aws first
    key, _ = await new_key(gw, tpm=100_000)
    body = {"model": "m", "prompt": "once upon", "stream": True, "max_tokens": 12}
    async with (
        httpx.AsyncClient(headers={"authorization": f"Bearer {key}"}) as http,
        http.stream("POST", gw.base_url + "/completions", json=body) as resp,
    ):
        request_id = resp.headers["x-request-id"]
        assert resp.headers["x-ratelimit-limit-tokens"] == "100000"
        text = "".join([piece async for piece in resp.aiter_text()])
    assert "[DONE]" in text and "error" not in text
    row = await ledger_row(tmp_path / "ops.db", request_id)
    assert (row["tokens_out"], row["continuations"], row["endpoints"]) == (
        12,
        1,
        "aws/r1/pool/0,gcp/r1/pool/0",
    )
    # aws read the prompt and sent 5; gcp read the prompt followed by those 5 (its prefill, as its own
    # tokenizer counts them) and sent 7: each at its own pool's prices (the same here).
    prompt = row["tokens_in"]
    assert prompt == count_tokens("once upon")
    prefilled = count_tokens("once upon" + "".join(f"t{i} " for i in range(5)))
    assert row["cost"] == pytest.approx((prompt + 5 * 2 + prefilled + 7 * 2) / 1e6)
    await assert_released(gw.gateway.proxy)
