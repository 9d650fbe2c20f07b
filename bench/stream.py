"""Streaming throughput through a gateway: content tokens/s of N concurrent 256-token streams.

Starts its own mock upstream (the shared harness's ``mock_upstream.py`` with ``MOCK_TOKENS`` and
``MOCK_DELAY_MS``) on CPU 1, the gateway under test on CPU 0, and a load client (this script, on CPU 1)
that opens ``--clients`` concurrent streams back to back for ``--seconds`` and counts content chunks.
Prints tokens/s direct and through each system, and the ratio.

    .venv/bin/python bench/stream.py --target-cmd ".venv/bin/skyfabric serve --config bench/stream-fleet.yaml"
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import subprocess
import sys
import time

import aiohttp
from procs import HERE, SHARED, start, start_mock, stop

BODY = (
    b'{"model":"tiny","stream":true,"max_tokens":256,'
    b'"messages":[{"role":"user","content":"Write a function that adds two numbers."}]}'
)


async def load(port: int, clients: int, seconds: float) -> tuple[float, int, int]:
    """(tokens/s, completed streams, errors)."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
    tokens = streams = errors = 0
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def user() -> None:
            nonlocal tokens, streams, errors
            while time.monotonic() < deadline:
                try:
                    async with session.post(url, data=BODY, headers=headers) as resp:
                        if resp.status != 200:
                            errors += 1
                            continue
                        done = False
                        async for line in resp.content:
                            if line.startswith(b"data: {") and b'"content"' in line:
                                tokens += 1
                            elif line.startswith(b"data: [DONE]"):
                                done = True
                        streams += done
                        errors += not done
                except aiohttp.ClientError:
                    errors += 1

        started = time.monotonic()
        await asyncio.gather(*[user() for _ in range(clients)])
        elapsed = time.monotonic() - started
    return tokens / elapsed, streams, errors


def run_load(port: int, clients: int, seconds: float) -> tuple[float, int, int]:
    """Run the load client in its own process pinned to CPU 1."""
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            sys.executable,
            __file__,
            "--client",
            str(port),
            "--clients",
            str(clients),
            "--seconds",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return float(out[0]), int(out[1]), int(out[2])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--target-cmd", default=f"{HERE.parent}/.venv/bin/skyfabric serve --config {HERE}/fleet.yaml"
    )
    ap.add_argument("--target-port", type=int, default=9300)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--delay-ms", default="2", help="mock upstream delay per token")
    ap.add_argument("--client", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.client:
        tps, streams, errors = asyncio.run(load(a.client, a.clients, a.seconds))
        print(tps, streams, errors)
        return
    mock = start_mock({"MOCK_TOKENS": "256", "MOCK_DELAY_MS": a.delay_ms})
    rows = []
    try:
        rows.append(("direct", *run_load(9100, a.clients, a.seconds)))
        systems = [("nginx", ["nginx", "-c", str(SHARED / "nginx.conf")], 9200)]
        systems.append(("target", shlex.split(a.target_cmd), a.target_port))
        for name, cmd, port in systems:
            proc = start(cmd, 0, port)
            try:
                run_load(port, a.clients, 2)  # warm-up
                rows.append((name, *run_load(port, a.clients, a.seconds)))
            finally:
                stop(proc)
    finally:
        stop(mock)
    base = rows[0][1]
    print(f"{'system':8} {'tokens/s':>10} {'streams':>8} {'errors':>7} {'vs direct':>10}")
    for name, tps, streams, errors in rows:
        print(f"{name:8} {tps:10.0f} {streams:8d} {errors:7d} {tps / base:9.1%}")


if __name__ == "__main__":
    main()
