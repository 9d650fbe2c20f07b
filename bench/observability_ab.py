"""Telemetry on vs off in ONE gateway process, switched by signals: paired runs that cancel load drift.

On a shared machine the CPU per request of separately started gateways drifts by ±20 % from run to run,
far more than the few percent telemetry costs. Here one gateway runs with metrics, the dashboard recorder
and tracing (OTLP to a local sink, default 1 % sampling; ``--ratio`` to change) installed; SIGUSR1 swaps
in the no-op observer, SIGUSR2 swaps the real ones back. Short wrk runs alternate off/on (order
randomized per pair) and the median of the paired ratios is the overhead.

    .venv/bin/python bench/observability_ab.py [--pairs 12] [--seconds 3] [--ratio 0.01]
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

from layers import cpu_seconds
from procs import HERE, MOCK_PY, SHARED, start, stop, wrk

MOCK_PORT, GATEWAY_PORT, SINK_PORT = 9140, 9341, 9142

SINK = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get('content-length', 0)))
        self.send_response(200); self.send_header('content-length', '0'); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
"""


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
    ap.add_argument("--ratio", type=float, default=0.01)
    ap.add_argument("--no-tracing", action="store_true", help="on = metrics and dashboard only")
    ap.add_argument("--no-otlp", action="store_true", help="tracing into the no-op global provider (no SDK)")
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        import uvloop

        uvloop.install()
        asyncio.run(serve(a.serve))
        return
    otlp = f"http://127.0.0.1:{SINK_PORT}/v1/traces"
    text = (HERE / "fleet.yaml").read_text().replace("9100", str(MOCK_PORT))
    text = text.replace("9300", str(GATEWAY_PORT))
    enabled = "false" if a.no_tracing else "true"
    endpoint = "" if a.no_otlp else f", otlp_endpoint: '{otlp}'"
    tracing = f"{{enabled: {enabled}, sample_ratio: {a.ratio}{endpoint}}}"
    text += f"observability: {{tracing: {tracing}}}\n"
    mock = start([MOCK_PY, str(SHARED / "mock_upstream.py"), str(MOCK_PORT)], 1, MOCK_PORT)
    sink = start([sys.executable, "-c", SINK, str(SINK_PORT)], 1, SINK_PORT)
    ratios, rows = [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "fleet.yaml"
            config.write_text(text)
            gw = start([sys.executable, __file__, "--serve", str(config)], 0, GATEWAY_PORT)
            try:
                wrk(GATEWAY_PORT, 2, a.conns)
                for _ in range(a.pairs):
                    pair = {}
                    for mode in random.sample(["off", "on"], 2):
                        os.kill(gw.pid, signal.SIGUSR1 if mode == "off" else signal.SIGUSR2)
                        time.sleep(0.3)
                        before = cpu_seconds(gw.pid)
                        result = wrk(GATEWAY_PORT, a.seconds, a.conns)
                        pair[mode] = (cpu_seconds(gw.pid) - before) / result["requests"] * 1e6
                    ratios.append(pair["on"] / pair["off"])
                    rows.append(pair)
            finally:
                stop(gw)
    finally:
        stop(sink)
        stop(mock)
    for pair in rows:
        off_us, on_us = pair["off"], pair["on"]
        print(f"off {off_us:6.1f} µs/req   on {on_us:6.1f} µs/req   on/off {on_us / off_us:.3f}")
    off = statistics.median(p["off"] for p in rows)
    on = statistics.median(p["on"] for p in rows)
    overhead = statistics.median(ratios) - 1
    print(f"median off {off:.1f} µs/req, on {on:.1f} µs/req; median paired overhead {overhead:+.1%}")


if __name__ == "__main__":
    main()
