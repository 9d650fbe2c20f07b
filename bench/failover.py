"""What a failover costs, measured on the real gateway against scriptable fake upstreams (loopback).

For each fault: the extra latency it adds to the client (time to first token, or total stream time,
compared with the same request on a healthy fleet), how many upstream attempts the rescued request used,
and for a blackholed provider the detection time (from the provider going silent to its ejection).

    .venv/bin/python bench/failover.py [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openai import AsyncOpenAI
from tests.conftest import fleet_data
from tests.support.fake_upstream import FakeUpstream, expected_text

from skyfabric.core.endpoints import fleet_endpoints
from skyfabric.core.fleet import parse_fleet
from skyfabric.gateway.app import Gateway
from skyfabric.http.server import Listener

TIMEOUTS = {"connect": 1, "first_byte": 5, "first_token": 5, "idle": 5, "response": 10, "total": 30}
TOKENS = 32


async def one_run(fault: Any, *, stream: bool = True) -> dict[str, float]:
    aws, gcp = FakeUpstream("aws", tokens=TOKENS), FakeUpstream("gcp", tokens=TOKENS)
    for up in (aws, gcp):
        up.token_delay = 0.005  # 200 tokens/s per stream, like a busy GPU replica
        await up.start()
    if fault is not None:
        aws.then(fault)
    fleet = parse_fleet(
        fleet_data(
            {"aws": [aws], "gcp": [gcp]}, timeouts=TIMEOUTS, health={"stall": 0.5, "probe_interval": 0}
        )
    )
    gateway = Gateway(fleet, fleet_endpoints(fleet))
    await gateway.start()
    listener = Listener(gateway)
    port = await listener.start("127.0.0.1", 0)
    gateway.proxy.states["gcp/r1/pool/0"].outstanding = 1000  # the first attempt goes to aws
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    started = time.monotonic()
    ttft = None
    text = ""
    out = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], stream=True
    )
    async for chunk in out:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft or time.monotonic() - started
            text += chunk.choices[0].delta.content
    total = time.monotonic() - started
    assert text == expected_text(TOKENS), text
    attempts = len(aws.requests) + len(gcp.requests)
    state = gateway.proxy.states["aws/r1/pool/0"]
    await listener.stop(0.1)
    await gateway.close()
    await aws.stop()
    await gcp.stop()
    return {"ttft": ttft or 0.0, "total": total, "attempts": attempts, "ejected": float(state.ejections > 0)}


async def main(runs: int) -> None:
    cases = [
        ("healthy", None),
        ("refused before headers (reset)", "reset"),
        ("503 before first token", {"status": 503}),
        ("stream cut after 16 tokens", {"cut_after": 16}),
        ("stream stalls after 16 tokens (blackhole)", {"stall_after": 16}),
        ("malformed event after 16 tokens", {"malformed_after": 16}),
    ]
    print(f"{runs} runs each; {TOKENS}-token streams at 5 ms/token; health.stall = 0.5 s, idle timeout 5 s\n")
    print(f"{'fault':44} {'TTFT p50':>9} {'total p50':>10} {'extra':>8} {'attempts':>9}")
    base_total = base_ttft = 0.0
    for name, fault in cases:
        results = [await one_run(fault) for _ in range(runs)]
        ttft = statistics.median(r["ttft"] for r in results) * 1000
        total = statistics.median(r["total"] for r in results) * 1000
        attempts = statistics.mean(r["attempts"] for r in results)
        if fault is None:
            base_total, base_ttft = total, ttft
        extra = total - base_total
        print(f"{name:44} {ttft:8.1f}ms {total:9.1f}ms {extra:+7.1f}ms {attempts:9.2f}")
    print(f"\n(healthy TTFT p50 {base_ttft:.1f} ms; 'extra' is the added total stream time)")


if __name__ == "__main__":
    import logging

    logging.disable(logging.CRITICAL)  # the faults are the point: their warnings are not news here
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    asyncio.run(main(ap.parse_args().runs))
