"""Memory over a long run: the gateway's RSS sampled while wrk drives it at a fixed share of its peak.

wrk has no rate limit, so the load is set by connections: first a short run at 32 connections finds the
peak, then the soak uses the connection count whose throughput is closest to ``--share`` of it. Prints
RSS every ``--every`` seconds and the spread (max/min − 1) after the warm-up minute.

    .venv/bin/python bench/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import re
import subprocess
import time
from pathlib import Path

from procs import HERE, SHARED, start, start_mock, stop, wrk


def rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--share", type=float, default=0.8)
    ap.add_argument("--every", type=int, default=30)
    a = ap.parse_args()
    mock = start_mock()
    gw = start([str(HERE.parent / ".venv/bin/skyfabric"), "serve", "--config", str(HERE / "fleet.yaml"),
                "--port", "9300"], 0, 9300)  # fmt: skip
    try:
        peak = wrk(9300, 5, 32)["rps"]
        rates = {c: wrk(9300, 3, c)["rps"] for c in (1, 2, 4, 8)}
        conns = min(rates, key=lambda c: abs(rates[c] - a.share * peak))
        print(
            f"peak {peak:.0f} req/s at 32 conns; soak at {conns} conns ≈ {rates[conns]:.0f} req/s "
            f"({rates[conns] / peak:.0%} of peak)",
            flush=True,
        )
        load = subprocess.Popen(
            [
                "taskset",
                "-c",
                "1",
                "wrk",
                "-t1",
                f"-c{conns}",
                f"-d{int(a.minutes * 60)}s",
                "-s",
                str(SHARED / "post.lua"),
                "http://127.0.0.1:9300/v1/chat/completions",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        samples = []
        started = time.monotonic()
        while load.poll() is None:
            time.sleep(a.every)
            elapsed = time.monotonic() - started
            samples.append((elapsed, rss_mib(gw.pid)))
            print(f"{elapsed:6.0f}s  RSS {samples[-1][1]:7.1f} MiB", flush=True)
        out = load.stdout.read() if load.stdout else ""
        total = re.search(r"(\d+) requests in", out)
        rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
        print(f"requests: {total.group(1) if total else '?'} at {rate.group(1) if rate else '?'} req/s")
        steady = [rss for t, rss in samples if t >= 60] or [rss for _, rss in samples]
        print(
            f"RSS after warm-up: min {min(steady):.1f} MiB, max {max(steady):.1f} MiB, "
            f"spread {max(steady) / min(steady) - 1:+.1%}"
        )
    finally:
        stop(gw)
        stop(mock)


if __name__ == "__main__":
    main()
