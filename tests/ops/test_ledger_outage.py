"""PostgreSQL cut off mid-traffic: the gateway keeps serving, the outbox grows, then drains, nothing lost."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MakeGateway
from tests.ops.conftest import pg_rows
from tests.support.counters import assert_released
from tests.support.fake_upstream import FakeUpstream
from tests.support.tcp_cut import TcpCut


async def readyz_ledger(http: httpx.AsyncClient, root: str) -> dict[str, Any]:
    detail: dict[str, Any] = (await http.get(root + "/readyz")).json()["operations"]["ledger"]
    return detail


async def eventually(check: Any, within: float, what: str) -> float:
    """Poll ``check`` (async, truthy when done) until it holds; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        if await check():
            return time.monotonic() - start
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {within}s: {what}")


@pytest.mark.slow
async def test_postgres_cut_off_mid_traffic_loses_nothing(
    make_gateway: MakeGateway, tmp_path: Path, pg_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    cut = TcpCut(5432)
    port = await cut.start()
    operations = {
        "keys": False,
        "database": f"postgresql://postgres@127.0.0.1:{port}/test",
        "table_prefix": pg_prefix,
        "database_timeout": 1.0,
        "ledger": {
            "enabled": True,
            "outbox": str(tmp_path / "outbox"),
            "ship_interval": 0.02,
            "retry_interval": 0.2,
        },
    }
    gw = await make_gateway({"aws": [FakeUpstream("a", tokens=6)]}, operations=operations)
    client = gw.client()
    ids: list[str] = []

    async def one(i: int) -> None:
        if i % 2:
            raw = await client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": f"q{i}"}]
            )
            raw.parse()
        else:
            raw = await client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": f"q{i}"}], stream=True
            )
            _ = [c async for c in raw.parse()]
        ids.append(raw.headers["x-request-id"])

    async with httpx.AsyncClient() as http:
        await asyncio.gather(*(one(i) for i in range(20)))
        await eventually(lambda: _async(len(pg_rows(pg_prefix, "final = 1")) == 20), 10, "the first 20 rows")

        cut.blackhole()
        served_during = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.5:  # traffic goes on as if nothing happened
            await asyncio.gather(*(one(i) for i in range(10)))
            served_during += 10
        detail = await readyz_ledger(http, gw.root)
        assert detail["reachable"] is False and "Timeout" in (detail["last_error"] or "")
        waiting = detail["pending_bytes"]
        assert waiting > 0
        await asyncio.gather(*(one(i) for i in range(10)))
        served_during += 10
        await asyncio.sleep(0.3)
        assert (await readyz_ledger(http, gw.root))["pending_bytes"] > waiting  # the outbox grows
        assert any("unreachable, records wait in the outbox" in r.getMessage() for r in caplog.records)

        cut.restore()

        async def drained() -> bool:
            d = await readyz_ledger(http, gw.root)
            return bool(d["reachable"] and d["pending_bytes"] == 0)

        await eventually(drained, 15, "the outbox drains once PostgreSQL is back")
    rows = pg_rows(pg_prefix)
    assert sorted(r["request_id"] for r in rows) == sorted(ids)  # none lost, none twice
    assert len(ids) == 20 + served_during and len(set(ids)) == len(ids)
    assert all(r["final"] == 1 and r["outcome"] == "ok" and r["tokens_out"] == 6 for r in rows)
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    await assert_released(gw.gateway.proxy)
    await cut.stop()


async def _async(value: bool) -> bool:
    return value
