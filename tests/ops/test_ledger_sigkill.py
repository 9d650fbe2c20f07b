"""A gateway SIGKILLed under load accounts, after its restart, for every request it answered."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import openai
import pytest

from tests.ops.conftest import PG_URL, pg_rows
from tests.support.gateway_proc import fleet_file, start_gateway, start_stub, stop
from tests.support.private_redis import free_port

#: Long enough a stream that the kill finds one the gateway is still sending (see the kill below).
STREAM_TOKENS = 200


@pytest.mark.slow
async def test_sigkill_under_load_loses_and_duplicates_no_record(tmp_path: Path, pg_prefix: str) -> None:
    stub_port, port = free_port(), free_port()
    stub = start_stub(stub_port)
    operations = {
        "keys": False,
        "database": PG_URL,
        "table_prefix": pg_prefix,
        "ledger": {"enabled": True, "outbox": str(tmp_path / "outbox"), "ship_interval": 0.5},
    }  # fmt: skip  (slow shipping: the kill finds records only in the outbox)
    fleet = fleet_file(tmp_path / "fleet.yaml", [f"http://127.0.0.1:{stub_port}/v1"], operations=operations)
    gateway = start_gateway(fleet, port, tmp_path / "gateway.log")
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    answered: dict[str, str] = {}  # request id → "plain", "stream" (complete) or "cut" (the kill cut it)
    usage: dict[str, tuple[int, int]] = {}
    stop_at = asyncio.Event()
    streaming: dict[str, int] = {}  # request id → chunks the client has of it so far

    async def worker(n: int) -> None:
        i = 0
        while not stop_at.is_set():
            i += 1
            messages = [{"role": "user", "content": f"worker {n} request {i}"}]
            try:
                if n % 2:  # half the workers ask for whole answers, half for (long) streams
                    raw = await client.chat.completions.with_raw_response.create(
                        model="m",
                        messages=messages,
                        max_tokens=8,  # type: ignore[arg-type]
                    )
                    rid = raw.headers["x-request-id"]
                    answer = raw.parse()
                    answered[rid] = "plain"
                    assert answer.usage is not None
                    usage[rid] = (answer.usage.prompt_tokens, answer.usage.completion_tokens)
                else:
                    raw = await client.chat.completions.with_raw_response.create(
                        model="m",
                        messages=messages,
                        max_tokens=STREAM_TOKENS,
                        stream=True,  # type: ignore[arg-type]
                    )
                    rid = raw.headers["x-request-id"]
                    answered[rid] = "cut"  # the client has its id from here on
                    async for _ in raw.parse():
                        streaming[rid] = streaming.get(rid, 0) + 1
                    del streaming[rid]
                    answered[rid] = "stream"
            except (openai.APIConnectionError, httpx_errors()):
                return  # the gateway is gone

    workers = [asyncio.create_task(worker(n)) for n in range(12)]
    await asyncio.sleep(2.0)
    # Kill while a stream is early in its answer. Not just any stream the client is reading: on a busy
    # machine the client lags, and a stream it is still reading may have been sent whole already (one of
    # 200 tokens takes the stub 0.8 s; one with fewer than 20 read is cut unless the client lags that much).
    deadline = time.monotonic() + 5
    while not any(n < 20 for n in streaming.values()) and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    os.kill(gateway.pid, signal.SIGKILL)
    gateway.wait(5)
    stop_at.set()
    await asyncio.gather(*workers, return_exceptions=False)
    cut = [rid for rid, how in answered.items() if how == "cut"]
    assert len(answered) > 100 and cut, (len(answered), len(cut))

    restarted = start_gateway(fleet, port, tmp_path / "gateway.log")
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rows = {r["request_id"]: r for r in pg_rows(pg_prefix)}
            if set(answered) <= set(rows) and not any(rows[rid]["final"] == 0 for rid in answered):
                break
            await asyncio.sleep(0.2)
    finally:
        stop(restarted)
        stop(stub)
    missing = set(answered) - set(rows)
    assert not missing, f"{len(missing)} answered requests have no ledger record"
    # No duplicates: one row per id (the primary key), and no row for an id the gateway never issued
    # beyond the requests in flight at the kill (recorded before their answer reached the client).
    assert len(rows) - len(answered) <= 12
    for rid, how in answered.items():
        row = rows[rid]
        if how == "plain":
            assert (row["tokens_in"], row["tokens_out"], row["outcome"]) == (*usage[rid], "ok")
        elif how == "stream":
            assert (row["tokens_out"], row["outcome"]) == (STREAM_TOKENS, "ok")
        else:  # its gateway died mid-stream: the next run closed its record
            assert row["outcome"] in ("interrupted", "ok") and row["final"] == 1
    assert sum(1 for rid in cut if rows[rid]["outcome"] == "interrupted") >= 1
    print(
        f"\nSIGKILL under load: {len(answered)} answered ({len(cut)} streams cut by the kill), "
        f"{len(rows)} ledger rows, {len(missing)} answered without a record"
    )
    log = (tmp_path / "gateway.log").read_text()
    assert "left by an earlier run are being shipped" in log


def httpx_errors() -> type[Exception]:
    import httpx

    return httpx.HTTPError
