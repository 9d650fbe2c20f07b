"""Three gateway processes, one key database, one Redis: limits exact across them, and Redis cut mid-test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway_proc import GatewayProcess, fleet_file
from tests.support.private_redis import PrivateRedis

pytestmark = pytest.mark.slow

ADMIN = "admin-credential-for-fleet-tests"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis().start()
    yield server
    server.kill()


async def start_fleet(
    tmp_path: Path, redis: PrivateRedis, up: FakeUpstream, n: int = 3
) -> list[GatewayProcess]:
    await up.start()
    fleet = fleet_file(
        tmp_path / "fleet.yaml",
        up.url,
        operations={
            "database": "keys.db",  # relative to the fleet file: one SQLite file for the three
            "redis": redis.url,
            "admin_key_env": "SF_FLEET_ADMIN",
            "key_refresh": 0.5,
            "limits": {"heartbeat": 0.2},
        },
    )
    gateways = [GatewayProcess(fleet, tmp_path / f"gw{i}.log", {"SF_FLEET_ADMIN": ADMIN}) for i in range(n)]
    for gw in gateways:
        await asyncio.to_thread(gw.wait_ready)
    return gateways


async def create_key(gateways: list[GatewayProcess], **fields: object) -> str:
    """A key made on the first gateway, once every gateway knows it (their caches reload it)."""
    async with httpx.AsyncClient(timeout=10) as http:
        made = await http.post(
            f"{gateways[0].root}/admin/keys",
            json={"name": "t", **fields},
            headers={"authorization": f"Bearer {ADMIN}"},
        )
        assert made.status_code == 201, made.text
        key: str = made.json()["key"]
        for gw in gateways[1:]:
            for _ in range(100):
                if (
                    await http.get(f"{gw.root}/v1/models", headers={"authorization": f"Bearer {key}"})
                ).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the key never reached every gateway")
    return key


async def until_limits(http: httpx.AsyncClient, gw: GatewayProcess, state: str, wait: float = 5.0) -> None:
    """``/readyz`` reports the limits ``state`` within ``wait`` seconds (a gateway's first heartbeat can
    meet a Redis that is still settling; the next one, 0.2 s later, recovers — logged both ways)."""
    deadline = time.monotonic() + wait
    while True:
        got = (await http.get(f"{gw.root}/readyz")).json()["operations"]["limits"]
        if got == state or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert got == state, gw.log.read_text()[-2000:]


def sdk(gw: GatewayProcess, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gw.root}/v1", api_key=key, max_retries=0, timeout=10)


async def test_three_gateways_share_one_keys_rpm_budget_and_survive_redis_going_away(
    tmp_path: Path, redis: PrivateRedis
) -> None:
    up = FakeUpstream("u", tokens=4)
    gateways = await start_fleet(tmp_path, redis, up)
    try:
        # -- 60 requests a minute, shared by three gateways ------------------------------------------------
        async with httpx.AsyncClient(timeout=5) as http:
            for gw in gateways:  # the limits are shared through Redis, not each gateway's own
                await until_limits(http, gw, "ok")
        key = await create_key(gateways, rpm=60)
        clients = [sdk(gw, key) for gw in gateways]

        async def one(i: int) -> int:
            try:
                await clients[i % 3].chat.completions.create(model="m", messages=HI)
                return 200
            except openai.RateLimitError:
                return 429

        started = time.monotonic()
        statuses = await asyncio.gather(*[one(i) for i in range(120)])
        elapsed = time.monotonic() - started
        admitted = statuses.count(200)
        print(f"rpm 60 over 3 gateways: {admitted} admitted of 120 in {elapsed:.2f}s")
        assert 59 <= admitted <= 61, (admitted, elapsed)
        assert admitted <= 60 + int(elapsed) and statuses.count(429) == 120 - admitted

        # -- a budget, spent through all three, stops within one request of its limit ----------------------
        budget = 400  # µUSD; 1 µUSD an input token, 2 an output token
        key = await create_key(gateways, budget=budget / 1e6, budget_period="day")
        spent, refused = 0, None
        for i in range(100):
            try:
                answer = await sdk(gateways[i % 3], key).chat.completions.create(
                    model="m", messages=HI, max_tokens=4
                )
            except openai.RateLimitError as exc:
                refused = exc
                break
            assert answer.usage is not None
            spent += answer.usage.prompt_tokens + 2 * answer.usage.completion_tokens
        assert refused is not None and refused.code == "insufficient_quota"
        print(f"budget {budget} µUSD over 3 gateways: {spent} spent when refused")
        assert budget - 75 // 4 - 4 * 2 <= spent <= budget

        # -- Redis cut: every gateway keeps serving by each key's policy, and comes back -------------------
        open_key = await create_key(gateways, rpm=6000)
        closed_key = await create_key(gateways, rpm=6000, failure_policy="closed")
        marks = [len(gw.log.read_text()) for gw in gateways]  # the log from Redis's death on
        redis.kill()
        for gw in gateways:
            for _ in range(3):
                await sdk(gw, open_key).chat.completions.create(model="m", messages=HI)
            with pytest.raises(openai.InternalServerError) as unavailable:
                await sdk(gw, closed_key).chat.completions.create(model="m", messages=HI)
            assert unavailable.value.status_code == 503
        async with httpx.AsyncClient(timeout=5) as http:
            for gw in gateways:
                assert (await http.get(f"{gw.root}/readyz")).json()["operations"]["limits"] == "degraded"
            redis.start()  # the same port: the gateways reconnect
            for gw in gateways:
                for _ in range(50):
                    if (await http.get(f"{gw.root}/readyz")).json()["operations"]["limits"] == "ok":
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError("a gateway never came back to the shared limits")
                await sdk(gw, closed_key).chat.completions.create(model="m", messages=HI)
    finally:
        for gw in gateways:
            gw.stop()
        await up.stop()
    for i, gw in enumerate(gateways):
        whole = gw.log.read_text()
        log = whole[marks[i] :]  # one transition each way for one outage, logged once
        assert log.count("limits: degraded") == 1, (i, log[-3000:])
        assert log.count("limits: ok") == 1
        assert ADMIN not in whole and key not in whole and open_key not in whole
