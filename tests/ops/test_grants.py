"""Grants: keys far from their limits are admitted in process from slices Redis charged in advance."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from skyfabric.core.errors import RateLimited
from skyfabric.core.fleet import Limits
from skyfabric.ops.grants import GRANT_TTL, RENEW_AHEAD
from skyfabric.ops.keys import KeyRecord, new_key_id
from skyfabric.ops.limiter import GRANT_HEADERS_TTL, Lease, Limiter
from skyfabric.ops.pricing import PriceBook, Prices
from skyfabric.ops.resp import Resp

SHARED = "redis://127.0.0.1:6379/0"
PRICES = PriceBook.of_models({"m": Prices(1.0, 2.0, 1.0)})


def key(**limits: Any) -> KeyRecord:
    return KeyRecord(id=new_key_id(), name="t", hash="h", hint="…", created=0.0, **limits)


async def admitted(limiter: Limiter, record: KeyRecord) -> Lease | None:
    try:
        return await limiter.admit(record, "m", 10, 10)
    except RateLimited:
        return None


async def redis_tat(record: KeyRecord) -> float:
    """Seconds of the key's request allowance used in Redis (its GCRA ``tat`` less Redis' now)."""
    client = Resp(SHARED, timeout=1.0)
    try:
        tat, now = await client.pipeline([("GET", "skyfabric:{" + record.id + "}:rpm"), ("TIME",)])
        return max(0.0, float(tat or 0) - (int(now[0]) + int(now[1]) / 1e6))
    finally:
        await client.close()


async def test_three_instances_share_a_big_rpm_through_grants_without_losing_or_doubling_a_unit() -> None:
    made = [Limiter(Limits(), SHARED, PRICES) for _ in range(3)]
    record = key(rpm=6400)  # grants of 100 requests
    calls = [0]
    for limiter in made:
        assert limiter.redis is not None
        admit = limiter.redis.admit

        async def counted(*a: Any, _admit: Any = admit) -> Any:
            calls[0] += 1
            return await _admit(*a)

        limiter.redis.admit = counted  # type: ignore[method-assign]
    try:
        started = time.monotonic()
        results: list[Lease | None] = []
        for _ in range(40):  # bursts, as a busy gateway sees them: grants arrive between them
            results += await asyncio.gather(*[admitted(made[i % 3], record) for i in range(200)])
            await asyncio.sleep(0.002)
            if len(results) == 5000:  # far from the limit: all admitted, most without a round trip
                assert all(r is not None for r in results) and calls[0] < 5000 / 4, calls[0]
        elapsed = time.monotonic() - started
        n = sum(r is not None for r in results)
        refill = int(elapsed * 6400 / 60) + 1
        assert n <= 6400 + refill, (n, elapsed)
        for limiter in made:  # settle them all, and give every grant's unused part back
            for lease in results:
                if lease is not None:
                    limiter.settle(lease, 10, 10)
            await limiter.close()
        # What Redis holds is what was admitted: every unused granted request came back.
        used = await redis_tat(record)
        assert abs(used * 6400 / 60 - n) <= refill + 1, (used * 6400 / 60, n, refill)
    finally:
        for limiter in made:
            await limiter.close()


async def test_a_key_near_its_limit_gets_no_grant_and_stays_exact() -> None:
    made = [Limiter(Limits(), SHARED, PRICES) for _ in range(3)]
    record = key(rpm=600)  # 9 requests a grant: granted only while 36 are left
    try:
        results = []
        for _ in range(10):
            results += await asyncio.gather(*[admitted(made[i % 3], record) for i in range(90)])
            await asyncio.sleep(0.005)
        assert 598 <= sum(r is not None for r in results) <= 601
    finally:
        for limiter in made:
            await limiter.close()


async def test_grant_slots_tokens_and_budget_come_back_to_the_grant_when_requests_settle() -> None:
    limiter = Limiter(Limits(), SHARED, PRICES)
    record = key(rpm=64_000, tpm=6_400_000, max_concurrent=1000, budget=1000.0)
    try:
        first = await admitted(limiter, record)  # by Redis; asks for a grant meanwhile
        assert first is not None and first.grant is None
        await asyncio.sleep(0.05)
        grant = limiter.grants[record.id]
        assert grant.requests == 1000 and grant.tokens == 100_000 and len(grant.slots) == 15
        second = await admitted(limiter, record)
        assert second is not None and second.grant is grant and second.ask.lease in limiter._running
        assert len(grant.slots) == 14 and grant.tokens == 100_000 - 20
        limiter.settle(second, 10, 2)  # 12 tokens, 14 µUSD of the 30 reserved
        assert len(grant.slots) == 15 and grant.tokens == 100_000 - 12
        assert grant.budget == 1000 * 1_000_000 // 64 - 14
        headers = dict(second.headers(False, time.time()))
        assert int(headers[b"x-ratelimit-remaining-requests"]) >= 64_000 - 2
    finally:
        await limiter.close()


async def test_a_grants_rate_limit_headers_are_built_once_per_ttl_and_protocol() -> None:
    limiter = Limiter(Limits(), SHARED, PRICES)
    record = key(rpm=64_000, tpm=6_400_000)
    try:
        await admitted(limiter, record)  # by Redis; asks for a grant meanwhile
        await asyncio.sleep(0.05)
        a, b = await admitted(limiter, record), await admitted(limiter, record)
        assert a is not None and b is not None and a.grant is not None and b.grant is a.grant
        now = time.time()
        first = a.headers(False, now)
        assert b.headers(False, now + GRANT_HEADERS_TTL / 2) is first  # reused within the TTL
        anthropic = b.headers(True, now)
        assert anthropic is not first and b"anthropic-ratelimit-requests-limit" in dict(anthropic)
        later = b.headers(False, now + GRANT_HEADERS_TTL * 2)
        assert later is not first and dict(later)[b"x-ratelimit-limit-requests"] == b"64000"
        assert int(dict(later)[b"x-ratelimit-remaining-requests"]) <= int(
            dict(first)[b"x-ratelimit-remaining-requests"]
        )
    finally:
        await limiter.close()


async def test_the_fast_path_follows_the_record_its_limits_and_the_budget_period() -> None:
    """The grant's fast path trusts a grant only for the record object it was cut for: a reloaded record
    with the same limits keeps the grant, new limits replace it, and a new budget period takes a new one."""
    wall = [20_834 * 86_400 - 5.0]  # 5 s before a UTC day ends
    limiter = Limiter(Limits(), SHARED, PRICES, wall=lambda: wall[0])
    record = key(rpm=64_000, tpm=6_400_000, budget=1000.0, budget_period="day")
    try:
        await admitted(limiter, record)  # by Redis; asks for a grant meanwhile
        await asyncio.sleep(0.05)
        grant = limiter.grants[record.id]
        lease = await admitted(limiter, record)
        assert lease is not None and lease.grant is grant and lease.verdict is None  # the fast path
        assert lease.ask.tokens == 20 and lease.ask.cost == 30 and grant.tokens == 100_000 - 20
        reloaded = dataclasses.replace(record)  # the key cache's next load: a new object, the same limits
        again = await admitted(limiter, reloaded)
        assert again is not None and again.grant is grant and grant.record is reloaded
        assert (await admitted(limiter, reloaded)).grant is grant  # type: ignore[union-attr]
        changed = dataclasses.replace(record, rpm=128_000)
        assert (await admitted(limiter, changed)).grant is None  # type: ignore[union-attr]
        assert limiter.grants[record.id] is not grant and not grant.live
        await asyncio.sleep(0.05)
        second = limiter.grants[record.id]
        assert (await admitted(limiter, changed)).grant is second  # type: ignore[union-attr]
        wall[0] += 10.0  # the next day: the grant's budget slice was of yesterday's
        crossed = await admitted(limiter, changed)
        assert crossed is not None and crossed.grant is None and not second.live
        assert crossed.ask.period != lease.ask.period
    finally:
        await limiter.close()


async def test_a_busy_grant_is_replaced_before_its_end_and_no_request_waits_for_redis() -> None:
    """A grant in use that never runs low is renewed ahead of its end: a fresh one is charged while the old
    one still admits, then the old one's unused part goes back. No request meanwhile goes to the script,
    and Redis ends up holding exactly what was admitted."""
    clock = [1000.0]
    limiter = Limiter(Limits(), SHARED, PRICES, clock=lambda: clock[0])
    assert limiter.redis is not None
    record = key(rpm=6400, max_concurrent=640)  # grants of 100 requests and 10 slots
    direct = [0]
    admit = limiter.redis.admit

    async def counted(*a: Any) -> Any:
        direct[0] += 1
        return await admit(*a)

    limiter.redis.admit = counted  # type: ignore[method-assign]
    leases: list[Lease] = []
    try:
        leases.append(await admitted(limiter, record))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        old = limiter.grants[record.id]
        assert direct[0] == 1 and old.expires == clock[0] + GRANT_TTL
        for _ in range(5):  # each settles before the next (its slot back to the grant): it never runs low
            leases.append(await admitted(limiter, record))  # type: ignore[arg-type]
            limiter.settle(leases[-1], 10, 10)
        limiter.settle(leases[0], 10, 10)
        assert all(lease.grant is old for lease in leases[1:]) and limiter.grants[record.id] is old
        clock[0] += GRANT_TTL - RENEW_AHEAD / 2  # near its end, far from low: renewed, not topped up
        leases.append(await admitted(limiter, record))  # type: ignore[arg-type]
        assert leases[-1].grant is old and old.fetching
        leases.append(await admitted(limiter, record))  # type: ignore[arg-type]  # the old one still admits
        assert leases[-1].grant is old
        await asyncio.sleep(0.05)
        fresh = limiter.grants[record.id]
        assert fresh is not old and fresh.live and not old.live and fresh.requests == 100
        assert fresh.expires == clock[0] + GRANT_TTL and fresh.record is record
        clock[0] += RENEW_AHEAD  # past the old grant's end: the fresh one admits
        leases.append(await admitted(limiter, record))  # type: ignore[arg-type]
        assert leases[-1].grant is fresh and direct[0] == 1
        for lease in leases[6:]:  # the old grant's requests settle with Redis, the fresh one's with the grant
            limiter.settle(lease, 10, 10)
        assert len(fresh.slots) == 10
    finally:
        await limiter.close()
    # Every unused unit of both grants came back: Redis holds no more than the requests admitted (200 were
    # charged in grants), and no slot.
    used = await redis_tat(record)
    assert used * 6400 / 60 <= len(leases) + 0.5, (used * 6400 / 60, len(leases))
    client = Resp(SHARED, timeout=1.0)
    try:
        slots = await client.pipeline([("ZCARD", "skyfabric:{" + record.id + "}:leases")])
        assert slots == [0]
    finally:
        await client.close()
