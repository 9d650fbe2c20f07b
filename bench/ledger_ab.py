"""The usage ledger on vs off in ONE gateway process, switched by signals (as ``observability_ab.py``).

The gateway runs with the ledger on (outbox fsynced every 5 ms, shipped to SQLite in a temporary
directory); SIGUSR1 swaps in the no-op observer — every observer off, metrics too, not only the
ledger's —, SIGUSR2 the observers back (the shipper process keeps running in both, idle when off; "with
the shipper process" adds its CPU). Short wrk runs alternate off/on, order randomized per pair; the
medians of the paired ratios are the overhead in CPU per request and in requests/s.

    .venv/bin/python bench/ledger_ab.py [--pairs 8] [--seconds 3] [--conns 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import procs
from layers import cpu_seconds, cpu_total
from procs import HERE, MOCK_PY, start, stop, wrk

# A git worktree's ../shared is not the main checkout's: the harness's folder may be named outright.
SHARED = procs.SHARED = Path(os.environ.get("BENCH_SHARED", procs.SHARED))

MOCK_PORT, GATEWAY_PORT = 9150, 9351


async def serve(config: Path) -> None:
    """The gateway, with a signal switch between its observers and the no-op one."""
    from skyfabric.core.endpoints import fleet_endpoints
    from skyfabric.core.fleet import load_fleet
    from skyfabric.gateway.app import Gateway
    from skyfabric.gateway.observe import Observer
    from skyfabric.http.server import Listener

    fleet = load_fleet(config)
    gateway = Gateway(fleet, fleet_endpoints(fleet))
    on, off = gateway.proxy.observer, Observer()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: setattr(gateway.proxy, "observer", off))
    loop.add_signal_handler(signal.SIGUSR2, lambda: setattr(gateway.proxy, "observer", on))
    await gateway.start()
    await Listener(gateway).start("127.0.0.1", GATEWAY_PORT)
    await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--fsync", type=float, default=0.005, help="the ledger's fsync_interval")
    ap.add_argument("--ship", type=float, default=0.05, help="the ledger's ship_interval")
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        import uvloop

        uvloop.install()
        asyncio.run(serve(a.serve))
        return
    text = (HERE / "fleet.yaml").read_text().replace("9100", str(MOCK_PORT))
    text = text.replace("9300", str(GATEWAY_PORT))
    mock = start([MOCK_PY, str(SHARED / "mock_upstream.py"), str(MOCK_PORT)], 1, MOCK_PORT)
    ratios, rps_ratios, rows, totals = [], [], [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "fleet.yaml"
            config.write_text(
                text + f"operations: {{keys: false, database: '{tmp}/ledger.sqlite', "
                f"ledger: {{enabled: true, fsync_interval: {a.fsync}, ship_interval: {a.ship}}}}}\n"
            )
            gw = start([sys.executable, __file__, "--serve", str(config)], 0, GATEWAY_PORT)
            try:
                wrk(GATEWAY_PORT, 2, a.conns)
                for _ in range(a.pairs):
                    pair, rps, total = {}, {}, {}
                    for mode in random.sample(["off", "on"], 2):
                        os.kill(gw.pid, signal.SIGUSR1 if mode == "off" else signal.SIGUSR2)
                        time.sleep(0.3)
                        before, before_all = cpu_seconds(gw.pid), cpu_total(gw.pid)
                        result = wrk(GATEWAY_PORT, a.seconds, a.conns)
                        print(f"{mode}: {result}", flush=True)
                        pair[mode] = (cpu_seconds(gw.pid) - before) / result["requests"] * 1e6
                        total[mode] = (cpu_total(gw.pid) - before_all) / result["requests"] * 1e6
                        rps[mode] = result["rps"]
                    ratios.append(pair["on"] / pair["off"])
                    rps_ratios.append(rps["on"] / rps["off"])
                    rows.append(pair)
                    totals.append(total)
            finally:
                stop(gw)
    finally:
        stop(mock)
    for pair in rows:
        off_us, on_us = pair["off"], pair["on"]
        print(f"off {off_us:6.1f} µs/req   on {on_us:6.1f} µs/req   on/off {on_us / off_us:.3f}")
    off = statistics.median(p["off"] for p in rows)
    on = statistics.median(p["on"] for p in rows)
    overhead = statistics.median(ratios) - 1
    print(f"median off {off:.1f} µs/req, on {on:.1f} µs/req; median paired overhead {overhead:+.1%}")
    print(f"requests/s on/off: median paired ratio {statistics.median(rps_ratios):.3f}")
    on_all = statistics.median(t["on"] for t in totals)
    off_all = statistics.median(t["off"] for t in totals)
    print(f"with the shipper process: median off {off_all:.1f} µs/req, on {on_all:.1f} µs/req")


if __name__ == "__main__":
    main()
