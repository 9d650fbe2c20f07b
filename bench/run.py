"""``make bench``: the gateway side by side with nginx, vllm-router and the LiteLLM proxy, in one run.

1. non-streaming chat at 32 connections and at 1 connection (``../shared/bench/overhead.py``);
2. streaming: 32 concurrent 256-token streams, tokens/s direct, via nginx, via skyfabric (``stream.py``);
3. the targets of the performance issue, checked against those numbers.

Every system under test is pinned to CPU 0; upstream and load generator share CPU 1. Absolute numbers on
a 2-core machine are noisy: read the ratios between rows of the same run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared" / "bench"
PEER_PY = Path("/tmp/peers/litellm-venv/bin/python")
TARGET = f"{ROOT}/.venv/bin/skyfabric serve --config {HERE}/fleet.yaml --port 9300"


def overhead(conns: int, seconds: int) -> dict[str, dict[str, float]]:
    out = subprocess.run(
        [
            str(PEER_PY),
            str(SHARED / "overhead.py"),
            "--target-cmd",
            TARGET,
            "--target-port",
            "9300",
            "--seconds",
            str(seconds),
            "--conns",
            str(conns),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    print(out.stdout, end="")
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        raise SystemExit("overhead.py failed")
    rows = {}
    for line in out.stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 6 and re.match(r"^[\d.]+$", parts[1]):
            rows[parts[0]] = {
                "rps": float(parts[1]),
                "p50": float(parts[2]),
                "p99": float(parts[3]),
                "added": float(parts[4]),
                "non2xx": float(parts[5]),
            }
    return rows


def streaming(seconds: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, str(HERE / "stream.py"), "--seconds", str(seconds), "--target-cmd", TARGET],
        capture_output=True,
        text=True,
        check=True,
    )
    print(out.stdout, end="")
    rows = {}
    for line in out.stdout.splitlines()[1:]:
        parts = line.split()
        rows[parts[0]] = float(parts[1])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    a = ap.parse_args()
    if not PEER_PY.exists() or not (Path("/tmp/peers/vrouter-venv/bin/vllm-router")).exists():
        subprocess.run(["bash", str(SHARED / "setup-peers.sh")], check=True)
    print(
        f"# skyfabric gateway benchmark — {time.strftime('%Y-%m-%d %H:%M')} on {os.uname().nodename}, "
        f"{os.cpu_count()} CPUs\n"
    )
    print("## Non-streaming chat, 32 connections")
    c32 = overhead(32, a.seconds)
    print("\n## Non-streaming chat, 1 connection")
    c1 = overhead(1, a.seconds)
    print("\n## Streaming: 32 clients × 256-token streams (tokens/s)")
    st = streaming(a.seconds)

    peers = [name for name in ("nginx", "vrouter") if name in c32]
    fastest = max(peers, key=lambda n: c32[n]["rps"])
    fastest_1 = min((n for n in peers if n in c1), key=lambda n: c1[n]["added"])
    target = c32["target"]
    checks = [
        (
            f"req/s at 32 conns ≥ 75 % of the fastest peer ({fastest})",
            target["rps"] / c32[fastest]["rps"],
            target["rps"] >= 0.75 * c32[fastest]["rps"],
        ),
        ("every response a 200 at 32 conns", target["non2xx"], target["non2xx"] == 0),
        (
            "added p50 at 1 conn ≤ fastest peer's + 0.1 ms",
            c1["target"]["added"] - c1[fastest_1]["added"],
            c1["target"]["added"] <= c1[fastest_1]["added"] + 0.1,
        ),
        (
            "streaming tokens/s ≥ 90 % of direct",
            st["target"] / st["direct"],
            st["target"] >= 0.9 * st["direct"],
        ),
    ]
    if "litellm" in c32:
        checks.insert(
            1,
            (
                "req/s ≥ 50× the LiteLLM proxy's",
                target["rps"] / c32["litellm"]["rps"],
                target["rps"] >= 50 * c32["litellm"]["rps"],
            ),
        )
    print("\n## Targets")
    for name, value, ok in checks:
        print(f"{'PASS' if ok else 'MISS'}  {name}: {value:.3g}")


if __name__ == "__main__":
    main()
