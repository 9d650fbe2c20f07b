"""CPU per request of the gateway with its telemetry off and on, side by side (method of ``layers.py``).

Variants, each the real ``skyfabric serve`` on the same fleet but its ``observability`` section:

- ``off``: no dashboard recorder, no GenAI metrics, no tracing (the Prometheus counters the gateway
  always had stay: that is the gateway before this work);
- ``metrics``: the GenAI and skyfabric metrics on ``/metrics``;
- ``default``: what a fleet file gets without an ``observability`` section (metrics + dashboard recorder);
- ``traced``: default plus tracing at its default sampling (1 % of requests without a client decision),
  spans exported over OTLP/HTTP to a local sink (the export thread's CPU counts: it is in the process);
- ``traced-all``: the same with every request traced (``sample_ratio: 1.0``);
- ``traced+logs``: traced plus JSON decision logs, one record per request (to /dev/null).

Rounds are interleaved (off, metrics, …, off, metrics, …) so that drift in a shared machine's load hits
every variant alike.

    .venv/bin/python bench/observability_overhead.py [--seconds 8] [--conns 32] [--rounds 2] [--only a,b]

The traced variants need the OTLP exporter: ``pip install 'skyfabric[otlp]'``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from layers import cpu_seconds
from procs import HERE, MOCK_PY, SHARED, start, stop, wrk

MOCK_PORT, GATEWAY_PORT, SINK_PORT = 9140, 9341, 9142

_OTLP = f"otlp_endpoint: 'http://127.0.0.1:{SINK_PORT}/v1/traces'"
_LOGS = "logs: {format: json, decisions: true}"
VARIANTS = {
    "off": "observability: {dashboard: false, metrics: false}\n",
    "metrics": "observability: {dashboard: false, metrics: true}\n",
    "default": "",
    "traced": f"observability: {{tracing: {{enabled: true, {_OTLP}}}}}\n",
    "traced-all": f"observability: {{tracing: {{enabled: true, sample_ratio: 1.0, {_OTLP}}}}}\n",
    "traced+logs": f"observability: {{tracing: {{enabled: true, {_OTLP}}}, {_LOGS}}}\n",
}

SINK = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get('content-length', 0)))
        self.send_response(200); self.send_header('content-length', '0'); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants (off is always run)")
    a = ap.parse_args()
    base = (
        (HERE / "fleet.yaml").read_text().replace("9100", str(MOCK_PORT)).replace("9300", str(GATEWAY_PORT))
    )
    mock = start([MOCK_PY, str(SHARED / "mock_upstream.py"), str(MOCK_PORT)], 1, MOCK_PORT)
    sink = start([sys.executable, "-c", SINK, str(SINK_PORT)], 1, SINK_PORT)
    chosen = ["off", *(v for v in a.only.split(",") if v != "off")]
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in chosen}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(a.rounds):
                for name in chosen:
                    extra = VARIANTS[name]
                    path = Path(tmp) / f"{name}.yaml"
                    path.write_text(base + extra)
                    cmd = [sys.executable, "-m", "skyfabric.cli", "serve", "--config", str(path)]
                    proc = start(cmd, 0, GATEWAY_PORT)
                    try:
                        wrk(GATEWAY_PORT, 2, a.conns)
                        before = cpu_seconds(proc.pid)
                        result = wrk(GATEWAY_PORT, a.seconds, a.conns)
                        used = cpu_seconds(proc.pid) - before
                        results[name].append((used / result["requests"] * 1e6, result["rps"]))
                    finally:
                        stop(proc)
                        time.sleep(0.5)
    finally:
        stop(sink)
        stop(mock)
    off = statistics.median(x for x, _ in results["off"])
    print(f"{'variant':12} {'median':>7} {'vs off':>7} {'min':>7} {'req/s':>7}  CPU µs/req of each round")
    for name, rows in results.items():
        median = statistics.median(x for x, _ in rows)
        each = " ".join(f"{x:.1f}" for x, _ in rows)
        rps = statistics.median(r for _, r in rows)
        low = min(x for x, _ in rows)
        print(f"{name:12} {median:7.1f} {median / off - 1:+7.1%} {low:7.1f} {rps:7.0f}  {each}")


if __name__ == "__main__":
    main()
