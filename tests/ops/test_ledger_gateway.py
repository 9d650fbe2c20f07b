"""The ledger behind a real gateway: one record per request, keyed by the ``x-request-id`` clients get."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx

from skyfabric.gateway.spend import answer_usage
from skyfabric.protocols.canonical import Usage
from tests.conftest import MakeGateway
from tests.support.counters import assert_released
from tests.support.fake_upstream import FakeUpstream


async def ledger_rows(path: Path, count: int, within: float = 5.0) -> dict[str, dict[str, Any]]:
    """The final rows once there are ``count`` of them (the shipper writes every few ms)."""
    deadline = time.monotonic() + within
    rows: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)  # not there until the ledger starts
            db.row_factory = sqlite3.Row
            rows = {
                r["request_id"]: dict(r) for r in db.execute("SELECT * FROM skyfabric_usage WHERE final = 1")
            }
            db.close()
        except sqlite3.OperationalError:
            rows = {}
        if len(rows) >= count:
            return rows
        await asyncio.sleep(0.02)
    raise AssertionError(f"{len(rows)} final ledger rows, expected {count}")


def operations(tmp_path: Path) -> dict[str, Any]:
    return {
        "keys": False,
        "database": str(tmp_path / "ledger.sqlite"),
        "ledger": {"enabled": True, "ship_interval": 0.01},
    }


async def test_every_answer_has_one_record_with_the_backends_usage_and_its_cost(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    aws = FakeUpstream("a", tokens=12).then("ok", "ok", {"cut_after": 5})
    gcp = FakeUpstream("b", tokens=12)
    models = [{"name": "m", "price_per_mtok_in": 1_000_000.0, "price_per_mtok_out": 2_000_000.0}]
    gw = await make_gateway(
        {"aws": [aws], "gcp": [gcp]},
        models=models,
        health={"probe_interval": 0},
        operations=operations(tmp_path),
        api_keys=[{"key": "sk-test-key-0001"}],
    )
    gw.gateway.proxy.states["gcp/r1/pool/0"].reported_waiting = 1000  # aws first, unless it failed
    client = gw.client()
    plain = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi there"}]
    )
    answer = plain.parse()
    plain_id = plain.headers["x-request-id"]
    assert answer._request_id == plain_id  # the SDK exposes it to the caller too
    # A stream whose client asked for no usage (the gateway asks, and strips it from the client's stream).
    stream = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "tell me"}], stream=True
    )
    chunks = [c async for c in stream.parse()]
    assert all(c.usage is None for c in chunks)
    stream_id = stream.headers["x-request-id"]
    # A stream cut after 5 tokens on aws and continued on gcp.
    cut = await client.completions.with_raw_response.create(
        model="m", prompt="once upon", stream=True, max_tokens=12
    )
    text = "".join([c.choices[0].text async for c in cut.parse() if c.choices])
    cut_id = cut.headers["x-request-id"]
    assert text.split() == [f"t{i}" for i in range(12)]
    assert len({plain_id, stream_id, cut_id}) == 3

    rows = await ledger_rows(tmp_path / "ledger.sqlite", 3)
    assert set(rows) == {plain_id, stream_id, cut_id}
    first = rows[plain_id]
    assert answer.usage is not None
    assert (first["tokens_in"], first["tokens_out"]) == (
        answer.usage.prompt_tokens,
        answer.usage.completion_tokens,
    )
    assert first["cost"] == answer.usage.prompt_tokens * 1.0 + answer.usage.completion_tokens * 2.0
    assert (first["status"], first["outcome"], first["attempts"], first["continuations"]) == (200, "ok", 1, 0)
    assert (first["provider"], first["region"], first["endpoints"]) == ("aws", "r1", "aws/r1/pool/0")
    assert (first["model"], first["kind"], first["protocol"], first["key_id"]) == (
        "m",
        "chat",
        "openai.chat",
        None,
    )
    assert first["latency_ms"] > 0 and first["ttft_ms"] is None
    second = rows[stream_id]
    assert (second["tokens_out"], second["outcome"], second["kind"]) == (12, "ok", "chat")
    assert (
        second["tokens_in"] > 0
        and second["ttft_ms"] is not None
        and second["ttft_ms"] <= second["latency_ms"]
    )
    third = rows[cut_id]
    assert (third["tokens_out"], third["continuations"], third["endpoints"]) == (
        12,
        1,
        "aws/r1/pool/0,gcp/r1/pool/0",
    )
    assert third["tokens_in"] == second["tokens_in"] - 1 or third["tokens_in"] > 0  # the client's prompt
    await assert_released(gw.gateway.proxy)


async def test_a_client_that_leaves_mid_stream_is_billed_for_what_was_generated(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    up = FakeUpstream("a", tokens=40, default={"stall_after": 6})
    gw = await make_gateway({"aws": [up]}, health={"probe_interval": 0}, operations=operations(tmp_path))
    # A token limit (Anthropic's clients always set one) makes the gateway ask the engine for the running
    # usage, so the tokens sent are known exactly at any cut; without one it bills the chunks sent (a
    # lower bound: see docs/operations.md).
    body = {"model": "m", "messages": [{"role": "user", "content": "go"}], "stream": True, "max_tokens": 40}
    async with (
        httpx.AsyncClient() as http,
        http.stream("POST", gw.base_url + "/chat/completions", json=body) as resp,
    ):
        rid = resp.headers["x-request-id"]
        seen = ""
        async for piece in resp.aiter_text():
            seen += piece
            if seen.count("t5 ") or seen.count('"t5'):
                break  # the client goes away with 6 tokens, while the backend stalls
    rows = await ledger_rows(tmp_path / "ledger.sqlite", 1)
    row = rows[rid]
    assert (row["outcome"], row["status"], row["tokens_out"]) == ("incomplete", 200, 6)
    await assert_released(gw.gateway.proxy)


async def test_readyz_reports_the_ledger(make_gateway: MakeGateway, tmp_path: Path) -> None:
    gw = await make_gateway({"aws": [FakeUpstream("a")]}, operations=operations(tmp_path))
    await gw.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    await ledger_rows(tmp_path / "ledger.sqlite", 1)
    async with httpx.AsyncClient() as http:
        detail = (await http.get(gw.root + "/readyz")).json()["operations"]["ledger"]
    assert detail["database"] == "sqlite" and detail["reachable"] is True
    assert detail["appended"] == 1 and detail["shipped"] == 1


def test_usage_is_read_from_a_whole_answer_in_either_protocol() -> None:
    body = (
        b'{"choices":[],"usage":{"prompt_tokens":120,"completion_tokens":4,"total_tokens":124,'
        b'"prompt_tokens_details":{"cached_tokens": 96}}}'
    )
    assert answer_usage(body, "openai") == Usage(120, 4, 96)
    assert answer_usage(b'{"usage":{"prompt_tokens":1,"completion_tokens":1}}', "openai") == Usage(1, 1, 0)
    assert answer_usage(b'{"choices":[]}', "openai") is None
    # Anthropic's input_tokens leaves cache reads and writes out; the seam's prompt counts them all.
    anthropic = (
        b'{"content":[],"usage":{"input_tokens":10,"cache_creation_input_tokens":5,'
        b'"cache_read_input_tokens":100,"output_tokens":7}}'
    )
    assert answer_usage(anthropic, "anthropic") == Usage(115, 7, 100, 5)


async def test_a_retried_request_counts_its_attempts_and_names_who_answered_or_who_failed_last(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    """Attempts count every call sent (retries and hedges, not continuations); the record names the
    endpoint that answered — or, for a request no endpoint could answer, the last one tried."""
    aws = FakeUpstream("a").then({"status": 500}, {"status": 500})
    gcp = FakeUpstream("b").then({"status": 503})
    gw = await make_gateway(
        {"aws": [aws], "gcp": [gcp]},
        health={"probe_interval": 0},
        operations=operations(tmp_path),
        retry={"max_attempts": 2, "budget_percent": 100, "backoff_base": 0.001, "backoff_max": 0.002},
    )
    gw.gateway.proxy.states["gcp/r1/pool/0"].reported_waiting = 1000  # aws first
    async with httpx.AsyncClient() as http:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        failed = await http.post(gw.root + "/v1/chat/completions", json=body)  # aws 500, then gcp 503
        assert failed.status_code >= 500
        retried = await http.post(gw.root + "/v1/chat/completions", json=body)  # aws 500, then gcp ok
        assert retried.status_code == 200
    rows = await ledger_rows(tmp_path / "ledger.sqlite", 2)
    first, second = rows[failed.headers["x-request-id"]], rows[retried.headers["x-request-id"]]
    assert (first["attempts"], first["endpoints"], first["provider"], first["outcome"]) == (
        2,
        "gcp/r1/pool/0",
        "gcp",
        "error",
    )
    assert first["status"] == failed.status_code
    assert (second["attempts"], second["endpoints"], second["provider"], second["status"]) == (
        2,
        "gcp/r1/pool/0",
        "gcp",
        200,
    )
    await assert_released(gw.gateway.proxy)
