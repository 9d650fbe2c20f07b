"""Managed keys on a running gateway: the admin API, the SDKs with those keys, limits and their headers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from skyfabric.gateway.usage_observer import KeysAndLedger
from tests.conftest import MakeGateway, RunningGateway
from tests.support.counters import assert_released
from tests.support.fake_upstream import FakeUpstream

ADMIN = "admin-credential-for-tests-0001"
HI = [{"role": "user", "content": "hi"}]


async def gateway(
    make_gateway: MakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, up: FakeUpstream, **ops: Any
) -> RunningGateway:
    monkeypatch.setenv("SF_TEST_ADMIN", ADMIN)
    return await make_gateway(
        {"aws": [up]},
        models=[
            {"name": "m", "aliases": ["alias-m"], "price_per_mtok_in": 1.0, "price_per_mtok_out": 2.0},
            {"name": "other"},
        ],
        operations={"database": str(tmp_path / "keys.db"), "admin_key_env": "SF_TEST_ADMIN", **ops},
        api_keys=[{"key": "static-fleet-key-0001", "name": "ci"}],
    )


def admin(gw: RunningGateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=gw.root, headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)


def sdk(gw: RunningGateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=0)


async def test_key_lifecycle_through_the_admin_api_and_the_sdks(
    make_gateway: MakeGateway,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    up = FakeUpstream("u", tokens=4)
    up.model = "m"
    gw = await gateway(make_gateway, tmp_path, monkeypatch, up)
    secrets: list[str] = [ADMIN]
    async with admin(gw) as http:
        anonymous = await http.get("/admin/keys", headers={"authorization": "Bearer static-fleet-key-0001"})
        assert anonymous.status_code == 401  # an API key does not open the admin API
        made = await http.post("/admin/keys", json={"name": "team-a", "models": ["m"], "rpm": 100})
        assert made.status_code == 201
        key = made.json()["key"]
        key_id = made.json()["id"]
        secrets.append(key)
        assert key.startswith("sk-sf-") and made.json()["hint"].endswith(key[-4:])
        listed = (await http.get("/admin/keys")).json()["data"]
        assert [k["id"] for k in listed] == [key_id] and key not in str(listed) and "hash" not in listed[0]
        assert (await http.get(f"/admin/keys/{key_id}")).json()["rpm"] == 100

        answer = await sdk(gw, key).chat.completions.with_raw_response.create(model="alias-m", messages=HI)
        assert answer.headers["x-ratelimit-limit-requests"] == "100"
        assert answer.headers["x-ratelimit-remaining-requests"] == "99"
        assert answer.parse().choices[0].message.content == "t0 t1 t2 t3 "
        # Anthropic's header is accepted too, and the admin credential is not an API key.
        body = {"model": "m", "messages": HI}
        assert (
            await http.post(
                "/v1/chat/completions", json=body, headers={"x-api-key": key, "authorization": ""}
            )
        ).status_code == 200
        assert (await http.post("/v1/chat/completions", json=body)).status_code == 401
        with pytest.raises(openai.PermissionDeniedError, match="may not use the model"):
            await sdk(gw, key).chat.completions.create(model="other", messages=HI)

        rotated = await http.post(f"/admin/keys/{key_id}/rotate", json={"overlap_seconds": 300})
        new = rotated.json()["key"]
        secrets.append(new)
        assert new != key and rotated.json()["previous_valid_until"] is not None
        for secret in (key, new):  # both, during the overlap
            await sdk(gw, secret).chat.completions.create(model="m", messages=HI)
        assert (await http.post(f"/admin/keys/{key_id}/revoke")).json()["revoked"] is not None
        for secret in (key, new):
            with pytest.raises(openai.AuthenticationError, match="revoked"):
                await sdk(gw, secret).chat.completions.create(model="m", messages=HI)
        await sdk(gw, "static-fleet-key-0001").chat.completions.create(model="m", messages=HI)
        ready = (await http.get("/readyz")).json()["operations"]
        assert ready["keys"] == "ok" and ready["limits"] == "local"
        metrics = (await http.get("/metrics")).text
    # Keys never appear in logs, metrics, or errors.
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in secrets:
        assert secret not in logged and secret not in metrics
    await assert_released(gw.gateway.proxy)


async def test_over_a_limit_is_429_with_retry_after_and_rate_limit_headers(
    make_gateway: MakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await gateway(make_gateway, tmp_path, monkeypatch, FakeUpstream("u", tokens=4))
    async with admin(gw) as http:
        key = (await http.post("/admin/keys", json={"name": "a", "rpm": 3, "max_concurrent": 1})).json()[
            "key"
        ]
    client = sdk(gw, key)
    for _ in range(3):  # streams: the concurrency slot is settled when each stream ends
        stream = await client.chat.completions.create(model="m", messages=HI, stream=True)
        assert (
            "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "t0 t1 t2 t3 "
        )
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(model="m", messages=HI)
    headers = refused.value.response.headers
    assert refused.value.code == "rate_limit_exceeded"
    assert int(headers["retry-after"]) == 20  # one request each 20 s at 3 a minute
    assert headers["x-ratelimit-remaining-requests"] == "0" and headers["x-ratelimit-limit-requests"] == "3"
    await assert_released(gw.gateway.proxy)


#: The usage ledger on as well: the keys' settlement then runs in the observer it shares with the ledger
#: (``gateway/usage_observer.py``), which must settle exactly as the keys filter alone does.
WITH_LEDGER = pytest.mark.parametrize(
    "ledger", [{}, {"ledger": {"enabled": True, "ship_interval": 0.01}}], ids=["keys", "keys+ledger"]
)


@WITH_LEDGER
async def test_a_token_budget_stops_a_key_within_one_request_of_its_limit(
    make_gateway: MakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ledger: dict[str, Any]
) -> None:
    up = FakeUpstream("u", tokens=8)
    gw = await gateway(make_gateway, tmp_path, monkeypatch, up, **ledger)
    observer = gw.gateway.proxy.observer
    fused = [o for o in getattr(observer, "observers", [observer]) if isinstance(o, KeysAndLedger)]
    assert len(fused) == (1 if ledger else 0)
    budget = 500  # µUSD ($0.0005); input costs 1 µUSD a token, output 2
    async with admin(gw) as http:
        made = await http.post(
            "/admin/keys", json={"name": "a", "budget": budget / 1e6, "budget_period": "day"}
        )
    client = sdk(gw, made.json()["key"])
    spent, refused = 0, None
    for _ in range(100):
        try:
            answer = await client.chat.completions.create(model="m", messages=HI, max_tokens=8)
        except openai.RateLimitError as exc:
            refused = exc
            break
        assert answer.usage is not None
        spent += answer.usage.prompt_tokens + answer.usage.completion_tokens * 2
    assert refused is not None and refused.code == "insufficient_quota"
    # Never over, and stopped once what is left is less than one request's reservation (its prompt
    # estimated at 4 bytes a token of its ~75-byte body, and its max_tokens).
    assert spent <= budget
    assert budget - spent < 75 // 4 + 8 * 2


@WITH_LEDGER
async def test_a_stream_is_settled_with_the_tokens_it_generated(
    make_gateway: MakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ledger: dict[str, Any]
) -> None:
    gw = await gateway(make_gateway, tmp_path, monkeypatch, FakeUpstream("u", tokens=6), **ledger)
    async with admin(gw) as http:
        key = (await http.post("/admin/keys", json={"name": "a", "tpm": 10_000})).json()["key"]
    client = sdk(gw, key)
    stream = await client.chat.completions.create(model="m", messages=HI, max_tokens=1000, stream=True)
    async for _ in stream:
        pass
    answer = await client.chat.completions.with_raw_response.create(model="m", messages=HI, max_tokens=1)
    left = int(answer.headers["x-ratelimit-remaining-tokens"])
    # The stream reserved ~1000 and was settled at its ~20-token prompt estimate + 6 generated: only the
    # second request's own reservation (prompt estimate + 1) is held on top.
    assert 10_000 - 60 <= left <= 10_000 - 6


async def test_the_keys_cli_drives_the_admin_api(
    make_gateway: MakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from click.testing import CliRunner

    from skyfabric.cli import cli

    gw = await gateway(make_gateway, tmp_path, monkeypatch, FakeUpstream("u", tokens=2))
    monkeypatch.setenv("SKYFABRIC_ADMIN_KEY", ADMIN)

    async def run(*args: str) -> str:
        result = await asyncio.to_thread(CliRunner().invoke, cli, ["keys", "--url", gw.root, *args])
        assert result.exit_code == 0, result.output
        return str(result.stdout)

    secret = (await run("create", "team-b", "--rpm", "10", "--model", "m*")).strip().splitlines()[-1]
    assert secret.startswith("sk-sf-")
    await sdk(gw, secret).chat.completions.create(model="m", messages=HI)
    listed = await run("list")
    assert "team-b" in listed and secret not in listed
    key_id = listed.splitlines()[1].split()[0]
    new = (await run("rotate", key_id, "--overlap", "0")).strip().splitlines()[-1]
    await sdk(gw, new).chat.completions.create(model="m", messages=HI)
    with pytest.raises(openai.AuthenticationError):
        await sdk(gw, secret).chat.completions.create(model="m", messages=HI)
    assert "revoked" in await run("revoke", key_id)
    with pytest.raises(openai.AuthenticationError):
        await sdk(gw, new).chat.completions.create(model="m", messages=HI)


async def test_keys_in_postgresql_when_the_fleet_file_says_so(
    make_gateway: MakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from skyfabric.ops.database import Database
    from skyfabric.ops.keystore import KeyStore

    url = "postgresql://postgres@127.0.0.1:5432/test"
    prefix = f"t{os.urandom(5).hex()}_"
    gw = await gateway(
        make_gateway,
        tmp_path,
        monkeypatch,
        FakeUpstream("u", tokens=2),
        database=url,
        table_prefix=prefix,
    )
    async with admin(gw) as http:
        made = (await http.post("/admin/keys", json={"name": "pg-team"})).json()
    store = KeyStore(Database.at(url, prefix=prefix))
    try:
        assert store.get(made["id"]) is not None and store.get(made["id"]).name == "pg-team"  # type: ignore[union-attr]
        with store._cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {store.table} WHERE hash = %s", (made["key"],))
            assert cur.fetchone()[0] == 0  # stored as its digest, never as itself
        await sdk(gw, made["key"]).chat.completions.create(model="m", messages=HI)
    finally:
        with store._cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {store.table}, {prefix}keys_migrations")
        store.close()


async def test_a_request_refused_by_the_router_after_admission_gives_its_hold_on_the_key_back(
    make_gateway: MakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keys filter admits (a concurrency slot and the reservation are taken), then the router refuses
    the prompt as too long for every model (400, ``context_length_exceeded``): ``ctx.on_refused`` must give
    the slot back, or the key — one request at a time — would be refused (429) until the lease expired."""
    monkeypatch.setenv("SF_TEST_ADMIN", ADMIN)
    up = FakeUpstream("u", tokens=4)
    up.model = "m"
    gw = await make_gateway(
        {"aws": [up]},
        models=[{"name": "m", "context_length": 32, "price_per_mtok_in": 1.0, "price_per_mtok_out": 2.0}],
        operations={"database": str(tmp_path / "keys.db"), "admin_key_env": "SF_TEST_ADMIN"},
    )
    async with admin(gw) as http:
        asked = {"name": "one-at-a-time", "max_concurrent": 1, "tpm": 100_000}
        made = await http.post("/admin/keys", json=asked)
        assert made.status_code == 201
        key = made.json()["key"]
    async with sdk(gw, key) as client:
        for _ in range(3):
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "word " * 20_000}], max_tokens=8
                )
            assert refused.value.code == "context_length_exceeded"
        answer = await client.chat.completions.create(model="m", messages=HI, max_tokens=8)
        assert answer.choices[0].message.content
    limiter = gw.gateway.operations.limiter
    assert limiter is not None
    assert not limiter._running  # no request holds a slot once all have ended
    await assert_released(gw.gateway.proxy)


@WITH_LEDGER
async def test_a_failed_request_gives_its_hold_on_the_key_back(
    make_gateway: MakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ledger: dict[str, Any]
) -> None:
    """The upstream refuses the request (a 400, passed to the client as it is, no retry): the key's
    concurrency slot and reservation go back at the request's end, so a key allowed one request at a time
    is admitted again at once (without it: 429 until the slot's lease ran out)."""
    up = FakeUpstream("u", tokens=4).then({"status": 400})
    gw = await gateway(make_gateway, tmp_path, monkeypatch, up, **ledger)
    async with admin(gw) as http:
        asked = {"name": "one-at-a-time", "max_concurrent": 1, "tpm": 100_000}
        key = (await http.post("/admin/keys", json=asked)).json()["key"]
    async with sdk(gw, key) as client:
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="m", messages=HI, max_tokens=8)
        answer = await client.chat.completions.create(model="m", messages=HI, max_tokens=8)
        assert answer.choices[0].message.content
    limiter = gw.gateway.operations.limiter
    assert limiter is not None and not limiter._running
    await assert_released(gw.gateway.proxy)
