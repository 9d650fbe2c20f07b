"""Limits shared through a real Redis by several limiters (instances), and what happens when it goes away."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from skyfabric.core.errors import RateLimited
from skyfabric.core.fleet import Limits
from skyfabric.ops.keys import KeyRecord, new_key_id
from skyfabric.ops.limiter import Lease, Limiter
from skyfabric.ops.pricing import PriceBook, Prices
from tests.support.private_redis import PrivateRedis

NO_PRICES = PriceBook.of_models({})

SHARED = "redis://127.0.0.1:6379/0"


def key(**limits: Any) -> KeyRecord:
    return KeyRecord(id=new_key_id(), name="t", hash="h", hint="…", created=0.0, **limits)


@pytest.fixture
async def limiters() -> AsyncIterator[list[Limiter]]:
    made = [Limiter(Limits(), SHARED, PriceBook.of_models({"m": Prices(1.0, 2.0, 1.0)})) for _ in range(3)]
    yield made
    for limiter in made:
        await limiter.close()


async def admitted(limiter: Limiter, record: KeyRecord, **kw: Any) -> Lease | None:
    try:
        lease = await limiter.admit(record, "m", kw.pop("prompt", 10), kw.pop("max_tokens", 10), **kw)
    except RateLimited:
        return None
    assert lease is not None
    return lease


async def test_three_instances_together_admit_one_keys_rpm_exactly(limiters: list[Limiter]) -> None:
    record = key(rpm=60)
    results = await asyncio.gather(*[admitted(limiters[i % 3], record) for i in range(150)])
    assert sum(r is not None for r in results) == 60  # well within a second: no refill yet
    with pytest.raises(RateLimited) as refused:
        await limiters[0].admit(record, "m", 10, 10)
    headers = dict(refused.value.headers)
    assert refused.value.status == 429 and headers[b"x-ratelimit-remaining-requests"] == b"0"
    assert 0 < refused.value.retry_after <= 1.0


async def test_tokens_and_budget_are_reserved_then_settled_across_instances(limiters: list[Limiter]) -> None:
    a, b, _ = limiters
    record = key(tpm=1000, budget=0.002)  # 2000 micro-USD; input costs 1, output 2 per token
    first = await admitted(a, record, prompt=100, max_tokens=500)  # reserves 600 tokens, 1100 µUSD
    assert first is not None
    assert await admitted(b, record, prompt=100, max_tokens=500) is None  # 1200 tokens > 1000
    a.settle(first, 100, 50)  # really 150 tokens, 200 µUSD
    await a.flush()
    second = await admitted(b, record, prompt=100, max_tokens=500)
    assert second is not None
    assert dict(second.headers(False, 0.0))[b"x-ratelimit-remaining-tokens"] == b"250"
    assert second.verdict.spent == 200 + 1100
    b.settle(second, 100, 300)  # 700 µUSD: 900 spent of 2000
    await b.flush()
    third = await admitted(a, record, prompt=100, max_tokens=10)  # 120 µUSD fits
    assert third is not None and third.verdict.spent == 900 + 120


async def test_a_concurrency_slot_is_freed_by_settlement_or_by_its_lease_expiring() -> None:
    limiter = Limiter(Limits(lease_ttl=0.3), SHARED, NO_PRICES)
    try:
        record = key(max_concurrent=2)
        leases = [await admitted(limiter, record) for _ in range(3)]
        assert [lease is not None for lease in leases] == [True, True, False]
        assert leases[0] is not None
        limiter.release(leases[0])
        await limiter.flush()
        assert await admitted(limiter, record) is not None
        # Renewed by heartbeats while they run...
        await asyncio.sleep(0.2)
        await limiter.beat()
        await asyncio.sleep(0.2)
        assert await admitted(limiter, record) is None
        # ...and freed once no instance renews them (it crashed).
        limiter._running.clear()
        await asyncio.sleep(0.4)
        assert await admitted(limiter, record) is not None
    finally:
        await limiter.close()


async def test_redis_down_means_local_shares_or_refusal_per_key_and_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="skyfabric.ops")
    redis = PrivateRedis().start()
    made = [Limiter(Limits(heartbeat=0.1), redis.url, NO_PRICES) for _ in range(3)]
    try:
        for limiter in made:
            await limiter.beat()
        await made[0].beat()
        assert made[0].instances == 3
        open_key, closed_key = key(rpm=60), key(rpm=60, failure_policy="closed")
        assert await admitted(made[0], open_key) is not None
        redis.kill()
        results = [await admitted(made[0], open_key) for _ in range(50)]
        assert made[0].state == "degraded"
        assert sum(r is not None for r in results) == 20  # its share: 60 / 3 instances
        with pytest.raises(RateLimited) as refused:
            await made[0].admit(closed_key, "m", 1, 1)
        assert refused.value.status == 503 and refused.value.code == "limits_unavailable"
        await made[0].beat()  # still down: no second log line
        degraded = [r for r in caplog.records if "limits: degraded" in r.getMessage()]
        assert len(degraded) == 1
        assert "127.0.0.1" in degraded[0].getMessage()
        redis.start()  # back, on the same port
        await made[0].beat()
        assert made[0].state == "ok"
        assert any("limits: ok" in r.getMessage() for r in caplog.records)
        assert await admitted(made[0], closed_key) is not None
    finally:
        for limiter in made:
            await limiter.close()
        redis.kill()


async def test_one_instance_without_redis_enforces_the_same_limits_in_process() -> None:
    limiter = Limiter(Limits(), None, NO_PRICES)
    record = key(rpm=5, max_concurrent=10)
    results = [await admitted(limiter, record) for _ in range(8)]
    assert sum(r is not None for r in results) == 5 and limiter.state == "local"


async def test_the_fleet_files_limits_options_are_honoured() -> None:
    redis = PrivateRedis().start()
    # instances: the share's divisor, whatever was seen; failure_policy: the default of keys without one.
    limiter = Limiter(
        Limits(instances=4, failure_policy="closed", default_max_tokens=100), redis.url, NO_PRICES
    )
    try:
        await limiter.beat()
        reserved = await limiter.admit(key(tpm=1000), "m", 20, None)
        assert reserved is not None and reserved.ask.tokens == 120  # prompt + default_max_tokens
        redis.kill()
        with pytest.raises(RateLimited) as refused:
            await limiter.admit(key(rpm=60), "m", 1, 1)
        assert refused.value.status == 503
        shares = [await admitted(limiter, key(rpm=60, failure_policy="open")) for _ in range(1)]
        assert shares[0] is not None and shares[0].ask.rpm == 15  # 60 / instances 4
    finally:
        await limiter.close()
        redis.kill()
