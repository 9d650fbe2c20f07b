"""Does ``skyfabric serve --workers N`` scale? N workers, each held to the same CPU share, side by side.

"One process per core, near-linear" needs more cores than a 2-CPU box has once the load generator and the
upstream take theirs. So each worker gets a *share* of a core instead: its own cgroup (v1 ``cpu`` or v2)
with a CFS quota of ``--share`` CPU (0.15 by default), all on CPU 0, while wrk and the mock upstream run
on CPU 1 and can drive far more than N shares need. The question a many-core box answers — is there any
shared bottleneck (accept lock, uneven SO_REUSEPORT spread, shared state) that keeps N workers from doing
N times the work of one? — is then answered here: total req/s against N, and each worker's CPU use.

    .venv/bin/python bench/workers.py [--max-workers 4] [--share 0.15] [--seconds 8] [--conns 64]

Needs a writable cgroup hierarchy (root in a container is enough); it says so and exits otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from procs import HERE, start, start_mock, stop, wrk

ROOT = HERE.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PERIOD_US = 10_000  # short periods: a throttled worker stalls 8.5 ms at most, not 85


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cgroup_base() -> tuple[Path, str]:
    """A writable parent cgroup and its flavour ("v1" or "v2")."""
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").exists() and os.access(v1, os.W_OK):
        return v1, "v1"
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.controllers").exists() and os.access(v2, os.W_OK):
        return v2, "v2"
    raise SystemExit("no writable cgroup cpu controller here: run as root, or on a box with enough cores")


def limit(pid: int, name: str, share: float) -> Path:
    """Put ``pid`` in a fresh cgroup holding it to ``share`` of one CPU."""
    base, flavour = cgroup_base()
    group = base / name
    group.mkdir(exist_ok=True)
    quota = int(share * PERIOD_US)
    if flavour == "v1":
        (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(quota))
    else:
        (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
    (group / "cgroup.procs").write_text(str(pid))
    return group


def release(groups: list[Path]) -> None:
    for group in groups:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:  # still has members for a moment after they exit
                time.sleep(0.1)


def workers_of(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children] or [pid]


def measure(n: int, a: argparse.Namespace) -> dict[str, float | list[float]]:
    serve = [str(ROOT / ".venv/bin/skyfabric"), "serve", "--config", str(HERE / "fleet.yaml")]
    proc = start([*serve, "--port", "9300", "--workers", str(n)], 0, 9300)
    groups: list[Path] = []
    try:
        pids = workers_of(proc.pid)
        if len(pids) != n:
            raise SystemExit(f"expected {n} workers, found {pids}")
        groups = [limit(pid, f"skyfabric-bench-w{i}", a.share) for i, pid in enumerate(pids)]
        wrk(9300, 2, a.conns)  # warm: connections, upstream pools, health state
        before = [cpu_seconds(pid) for pid in pids]
        started = time.monotonic()
        result = wrk(9300, a.seconds, a.conns)
        elapsed = time.monotonic() - started
        used = [(cpu_seconds(pid) - b) / elapsed for pid, b in zip(pids, before, strict=True)]
        per_request = sum(used) * elapsed / result["requests"] * 1e6
        return {"rps": result["rps"], "p50": result["p50"], "cpu": used, "us": per_request}
    finally:
        stop(proc)
        release(groups)
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--max-workers", type=int, default=4)
    ap.add_argument("--share", type=float, default=0.15, help="CPU share of each worker (CFS quota)")
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--conns", type=int, default=64)
    a = ap.parse_args()
    cgroup_base()
    mock = start_mock()
    rows = []
    try:
        for n in range(1, a.max_workers + 1):
            rows.append((n, measure(n, a)))
            print(f"  {n} worker(s): {rows[-1][1]['rps']:.0f} req/s", file=sys.stderr, flush=True)
    finally:
        stop(mock)
    one = float(rows[0][1]["rps"])  # type: ignore[arg-type]
    load = os.getloadavg()
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs; load {load[0]:.2f}"
    )
    print(f"each worker: its own cgroup, {a.share:.2f} CPU (CFS quota), all on CPU 0; wrk + mock on CPU 1")
    print(f"{a.conns} connections, {a.seconds} s per row\n")
    print("| workers | req/s | × one worker | per worker | p50 ms | CPU µs/request | CPU used per worker |")
    print("|---|---|---|---|---|---|---|")
    for n, r in rows:
        rps = float(r["rps"])  # type: ignore[arg-type]
        cpu = " / ".join(f"{c:.2f}" for c in r["cpu"])  # type: ignore[union-attr]
        p50, us = float(r["p50"]), float(r["us"])  # type: ignore[arg-type]
        print(f"| {n} | {rps:.0f} | {rps / one:.2f} | {rps / n / one:.0%} | {p50:.2f} | {us:.0f} | {cpu} |")


if __name__ == "__main__":
    main()
