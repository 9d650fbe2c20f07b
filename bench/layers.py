"""Side by side, one run: the transport floor, the gateway, and the gateway minus one feature at a time.

Besides req/s (which on 2 cores is bounded by the load generator's core), it reports the CPU time each
variant spent per request, read from ``/proc/PID/stat``: the figure that separates them robustly.

    .venv/bin/python bench/layers.py [--seconds 8] [--conns 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from procs import HERE, start, start_mock, stop, wrk

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def descendants(pid: int) -> list[int]:
    """``pid``'s living child processes and theirs (the ledger's shipper)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += [int(child), *descendants(int(child))]
    return out


def cpu_total(pid: int) -> float:
    """CPU seconds of ``pid`` and of its living descendants (they inherit its CPU pin, so share its core)."""
    return sum(cpu_seconds(p) for p in [pid, *descendants(pid)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--conns", type=int, default=32)
    a = ap.parse_args()
    mock = start_mock()
    rows = []
    try:
        for mode in ("bare", "gateway", "no-metrics", "no-health"):
            proc = start([sys.executable, str(HERE / "variants.py"), mode], 0, 9301)
            try:
                wrk(9301, 2, a.conns)
                before = cpu_seconds(proc.pid)
                result = wrk(9301, a.seconds, a.conns)
                per_request = (cpu_seconds(proc.pid) - before) / result["requests"] * 1e6
                rows.append((mode, result["rps"], result["p50"], per_request))
            finally:
                stop(proc)
                time.sleep(0.5)
    finally:
        stop(mock)
    gateway = next(rps for mode, rps, _, _ in rows if mode == "gateway")
    print(f"{'variant':12} {'req/s':>9} {'p50 ms':>8} {'vs gateway':>11} {'CPU µs/req':>11}")
    for mode, rps, p50, per_request in rows:
        print(f"{mode:12} {rps:9.0f} {p50:8.2f} {rps / gateway:10.0%} {per_request:11.1f}")


if __name__ == "__main__":
    main()
