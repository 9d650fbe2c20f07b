"""Cache-aware routing on the embedded fleet: prefix affinity on against plain least-load, side by side.

Three replicas of the shipped model (``skyfabric up``'s processes, one per "cloud") behind the real gateway;
``--conversations`` multi-turn conversations, each with its own ``--system``-token system prompt (a coding
agent's repository map), run interleaved: every conversation sends its turns one after another (each turn
resends the whole conversation, as chat clients do), all conversations at once, at most ``--concurrency``
requests in flight. Measured per run, on a fresh fleet (cold caches):

* **landed on its prefix**: turns after a conversation's first that went to a replica which had served an
  earlier turn of it (so holds its prefix: the replicas' caches are far larger than the workload here), by
  the gateway's ``x-skyfabric-backend`` answer header;
* the replicas' own ``vllm:prefix_cache_hits_total / queries_total`` (tokens), summed;
* throughput (turns per second over the run) and turn latency p50/p95.

    PYTHONPATH=src .venv/bin/python bench/affinity_routing.py [--conversations 30] [--turns 4]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_prompts import long_text
from replica_throughput import free_port, metrics, resolve_model_dir

from skyfabric.control import EMBEDDED_FLEET
from skyfabric.control.supervisor import EmbeddedFleet
from skyfabric.core.fleet import load_fleet


def fleet_with(affinity: bool) -> Any:
    fleet = load_fleet(EMBEDDED_FLEET)
    data = fleet.model_dump(mode="json", exclude_none=True)
    for model in data["models"]:
        model["affinity"] = affinity
    data.pop("observability", None)  # the dashboard's recorder is not what is measured
    return type(fleet).model_validate(data)


def base_port(n: int) -> int:
    """A port with ``n`` free ports after it (replicas take consecutive ports)."""
    while True:
        port = free_port()
        if all(free_port_at(port + i) for i in range(n)):
            return port


def free_port_at(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def conversation(
    client: AsyncOpenAI,
    system: str,
    index: int,
    turns: int,
    max_tokens: int,
    gate: asyncio.Semaphore,
    record: list[tuple[int, int, str, float]],
) -> None:
    messages: list[dict[str, str]] = [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Task {index}: add a helper to module {index}."},
    ]
    for turn in range(turns):
        async with gate:
            started = time.perf_counter()
            raw = await client.chat.completions.with_raw_response.create(
                model="skyfabric-code",
                messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            seconds = time.perf_counter() - started
        answer = raw.parse().choices[0].message.content or ""
        record.append((index, turn, raw.headers.get("x-skyfabric-backend", "?"), seconds))
        messages += [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": f"Now handle the case {turn} of task {index}."},
        ]


async def workload(port: int, systems: list[str], args: argparse.Namespace) -> dict[str, Any]:
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600, max_retries=0)
    gate = asyncio.Semaphore(args.concurrency)
    record: list[tuple[int, int, str, float]] = []
    order = list(range(len(systems)))
    random.Random(7).shuffle(order)
    started = time.perf_counter()

    async def staggered(i: int, delay: float) -> None:
        await asyncio.sleep(delay)  # conversations start spread out, as users do
        await conversation(client, systems[i], i, args.turns, args.max_tokens, gate, record)

    await asyncio.gather(*(staggered(i, 0.1 * k) for k, i in enumerate(order)))
    elapsed = time.perf_counter() - started
    await client.close()
    served: dict[int, set[str]] = {}
    landed = later = 0
    for conv, turn, backend, _ in sorted(record, key=lambda r: (r[0], r[1])):
        if turn > 0:
            later += 1
            landed += backend in served.get(conv, set())
        served.setdefault(conv, set()).add(backend)
    latencies = sorted(r[3] for r in record)
    per_backend: dict[str, int] = {}
    for r in record:
        per_backend[r[2]] = per_backend.get(r[2], 0) + 1
    return {
        "landed": landed / later if later else float("nan"),
        "turns": len(record),
        "throughput": len(record) / elapsed,
        "p50": statistics.median(latencies),
        "p95": latencies[int(0.95 * (len(latencies) - 1))],
        "spread": sorted(per_backend.values(), reverse=True),
        "elapsed": elapsed,
    }


def run(affinity: bool, systems: list[str], args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    fleet = EmbeddedFleet(fleet_with(affinity), "127.0.0.1", port, base_port(3))
    try:
        fleet.start(timeout=300)
        result = asyncio.run(workload(port, systems, args))
        hits = queries = 0.0
        for child in fleet.replicas:
            m = metrics(child.health_url.removesuffix("/health"))
            hits += m.get("vllm:prefix_cache_hits_total", 0.0)
            queries += m.get("vllm:prefix_cache_queries_total", 0.0)
        result["token_hits"] = hits / queries if queries else float("nan")
        return result
    finally:
        fleet.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--conversations", type=int, default=30)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system", type=int, default=1500, help="system prompt tokens per conversation")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    args = parser.parse_args()
    model_dir, what = resolve_model_dir(args.model_dir)
    print(
        f"model: {model_dir} ({what}); {args.conversations} conversations x {args.turns} turns, "
        f"{args.system}-token system prompts, {args.concurrency} in flight"
    )
    corpus = long_text(model_dir, args.system * 2)
    chars = len(corpus) // 2
    systems = [
        f"You are coding agent #{i}. Repository map follows.\n" + corpus[(i * 997) % chars :][:chars]
        for i in range(args.conversations)
    ]
    print("\n| routing | turns on a replica holding their prefix | prefix-cache token hits | turns/s | "
          "turn latency p50 / p95 s | turns per replica |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    results = {}
    for label, affinity in (("affinity", True), ("least-load", False)):
        r = results[label] = run(affinity, systems, args)
        print(
            f"| {label} | {r['landed']:.0%} | {r['token_hits']:.0%} | {r['throughput']:.2f} | "
            f"{r['p50']:.2f} / {r['p95']:.2f} | {r['spread']} |",
            flush=True,
        )
    ratio = results["affinity"]["throughput"] / results["least-load"]["throughput"]
    print(f"\nthroughput, affinity / least-load: {ratio:.2f}")


if __name__ == "__main__":
    main()
