"""Warm CPU cost of each step that keys, Redis limits and the ledger add to a request, in a real gateway.

Builds the gateway from ``keys_limits.py``'s "all" fleet (a managed key with all four limits, enforced
through Redis, and the usage ledger shipped to SQLite by its shipper process), then runs the request path's
operations steps on real objects in a loop — the keys filter, and the observer hooks the router calls for a
whole answer — timing each with ``perf_counter_ns``. No upstream is called: the steps get the answer's body
as the router would hand it over. Warm caches: the same code in a serving process costs 2–3× this
(``operations_ab.py``), so use it to compare two trees side by side, not as the gateway's overhead.

    .venv/bin/python bench/operations_cost.py [--rounds 8]

Needs Redis at 127.0.0.1:6379 (as ``keys_limits.py`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from keys_limits import fleets

STEPS = ("filter", "request_start", "attempt_start", "attempt_end", "request_end")
BODY = (
    b'{"id":"chatcmpl-mock","object":"chat.completion","created":1,"model":"tiny","choices":[{"index":0,'
    b'"finish_reason":"stop","message":{"role":"assistant","content":"' + b"hello " * 16 + b'"}}],'
    b'"usage":{"prompt_tokens":10,"completion_tokens":16,"total_tokens":26}}'
)
RAW = (
    b'{"model":"tiny","messages":[{"role":"user","content":"Write a function that adds two numbers."}],'
    b'"max_tokens":16}'
)


async def measure(config: Path, rounds: int, per_round: int) -> dict[str, float]:
    from skyfabric.core.endpoints import fleet_endpoints
    from skyfabric.core.fleet import load_fleet
    from skyfabric.gateway import pipeline
    from skyfabric.gateway.app import Gateway
    from skyfabric.http.messages import Request
    from skyfabric.protocols.frontends.openai import OpenAIFrontend

    fleet = load_fleet(config)
    gateway = Gateway(fleet, fleet_endpoints(fleet), fleet_path=config)
    await gateway.start()
    try:
        proxy = gateway.proxy
        state = next(iter(proxy.states.values()))
        frontend = OpenAIFrontend()
        headers = [(b"authorization", b"Bearer sk-bench"), (b"content-type", b"application/json")]
        request = Request(b"POST", b"/v1/chat/completions", b"", headers, RAW)
        observer = proxy.observer
        clock = time.perf_counter_ns
        total = [0] * len(STEPS)
        n = 0
        for r in range(rounds):
            for _ in range(per_round):
                ctx = pipeline.context(gateway, request, frontend)
                t0 = clock()
                for step in gateway.filters:
                    waiting = step(request, ctx)
                    if waiting is not None:
                        await waiting  # type: ignore[misc]
                t1 = clock()
                observer.request_start(ctx)
                t2 = clock()
                observer.attempt_start(ctx, state, "attempt")
                t3 = clock()
                observer.attempt_end(ctx, state, "ok", 0.01, BODY)
                t4 = clock()
                observer.request_end(ctx, 200, 0.01)
                t5 = clock()
                ctx.finish()
                if r >= 2:  # the first rounds warm up (and let the key's grant arrive)
                    for i, d in enumerate((t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                        total[i] += d
                    n += 1
            await asyncio.sleep(0.05)  # the loop's own tasks (grant top-ups, heartbeats) run between rounds
        empty = min(-clock() + clock() for _ in range(1000))
        return {step: (t / n - empty) / 1000 for step, t in zip(STEPS, total, strict=True)}
    finally:
        await gateway.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--per-round", type=int, default=5000)
    a = ap.parse_args()
    import uvloop

    with tempfile.TemporaryDirectory() as tmp:
        config = fleets(Path(tmp))["all"]
        costs = uvloop.run(measure(config, a.rounds, a.per_round))
    print(
        "  ".join(f"{step} {us:.2f} µs" for step, us in costs.items()),
        f"  total {sum(costs.values()):.2f} µs",
    )


if __name__ == "__main__":
    sys.exit(main())
