"""Warm CPU cost of each step that keys, Redis limits and the ledger add to a request, in a real gateway.

Builds the gateway from ``keys_limits.py``'s "all" fleet (a managed key with all four limits, enforced
through Redis, and the usage ledger shipped to SQLite by its shipper process), then runs the request path's
operations steps on real objects in a loop — the keys filter, and the observer hooks the router calls for a
whole answer — timing each with ``perf_counter_ns``. No upstream is called: the steps get the answer's body
as the router would hand it over. Warm caches: the same code in a serving process costs 2–3× this
(``operations_ab.py``), so use it to compare two trees side by side, not as the gateway's overhead.

``--cold`` writes to 8 MiB of memory (one byte per cache line) before each request, outside the timed
steps, so that each step starts with its code and data out of the CPU's caches, as it does in a serving
process: between two requests of one connection the event loop runs the others', and the operations
steps then cost 2–3× their warm time. Measured (2026-12-02): warm 12.9 µs, cold 21.8 µs for all steps, where
the serving process read about 22 µs for the same hooks (``TIME_HOOKS=cpu operations_ab.py``). What makes
the operations path cheap in place is touching less memory — fewer functions, objects and dictionaries
per request — more than running fewer instructions; ``--cold`` measures that in a quiet loop.

    .venv/bin/python bench/operations_cost.py [--rounds 8] [--cold]

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


#: What ``--cold`` writes before each request: larger than the caches of the machines this runs on.
THRASH_BYTES = 8 << 20


async def measure(config: Path, rounds: int, per_round: int, cold: bool = False) -> dict[str, float]:
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
        thrash = bytearray(THRASH_BYTES if cold else 0)
        zeros = bytes(len(thrash) // 64)
        for r in range(rounds):
            for i in range(per_round):
                if cold:
                    thrash[i % 64 :: 64] = zeros  # every cache line of 8 MiB, written: the caches are others'
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
    ap.add_argument("--cold", action="store_true", help="evict the CPU's caches before each request")
    a = ap.parse_args()
    import uvloop

    with tempfile.TemporaryDirectory() as tmp:
        config = fleets(Path(tmp))["all"]
        costs = uvloop.run(measure(config, a.rounds, a.per_round, a.cold))
    print(
        "cold" if a.cold else "warm",
        "  ".join(f"{step} {us:.2f} µs" for step, us in costs.items()),
        f"  total {sum(costs.values()):.2f} µs",
    )


if __name__ == "__main__":
    sys.exit(main())
