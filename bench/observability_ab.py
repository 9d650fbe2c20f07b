"""Telemetry on vs off in ONE gateway process, alternated every few hundred milliseconds under steady load.

On a shared machine the CPU per request of separately started gateways drifts by ±20 % from run to run,
and even 3-second paired runs drift by more than the few percent telemetry costs (other engineers'
jobs come and go within seconds). So the gateway here switches between its real observers ("on") and
the no-op one ("off") itself, every ``--slice`` seconds, while one long wrk run keeps it busy; each slice
records the process's CPU time (every thread: the OTLP export thread counts) and the requests answered.
Adjacent slices form pairs; the median of the pairs' on/off ratios is the overhead, and the total CPU of
each mode over its total requests is printed beside it.

"on" is what the fleet file asks for: by default the GenAI metrics, the dashboard's recorder and
tracing (OTLP/HTTP to a local collector stand-in, default 1 % sampling; ``--ratio`` to change,
``--no-otlp`` for the process's global provider, ``--no-tracing`` for metrics and dashboard only).

    .venv/bin/python bench/observability_ab.py [--seconds 40] [--slice 0.25] [--ratio 0.01]
    .venv/bin/python bench/observability_ab.py --profile   # cProfile of each mode, top functions

Start-up's heap is frozen as ``skyfabric serve`` freezes it (``serve.settle_heap``); ``NO_GC_FREEZE=1``
measures without.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ab import Collector, count_answers, window
from procs import HERE, MOCK_PY, SHARED, start, stop, wrk, wrk_start

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


async def serve(config: Path, out: Path, slice_s: float, profile: bool, aa: bool = False) -> None:
    """The gateway; on SIGUSR1 it alternates its observers with the no-op one until SIGUSR2."""
    from skyfabric.core.endpoints import fleet_endpoints
    from skyfabric.core.fleet import load_fleet
    from skyfabric.gateway.app import Gateway
    from skyfabric.gateway.observe import Observer
    from skyfabric.http.server import Listener

    fleet = load_fleet(config)
    gateway = Gateway(fleet, fleet_endpoints(fleet))
    proxy = gateway.proxy
    modes = {
        "on": (proxy.observer, proxy.sampler, proxy.traced_observer),
        "off": (Observer(), None, Observer()),
    }
    if aa:
        modes["on"] = (Observer(), None, Observer())
    hook_ns = [0]
    if os.environ.get("TIME_HOOKS"):  # how long the hooks themselves take in place (wall, ns)
        from skyfabric.gateway.observe import Observers

        inner = proxy.observer
        timed = Observers([inner, Observer()])
        for name in ("request_start", "request_end", "attempt_start", "attempt_end", "upstream_headers"):
            f = getattr(inner, name)

            def wrap(*args, _f=f):  # type: ignore[no-untyped-def]
                t = time.perf_counter_ns()
                try:
                    return _f(*args)
                finally:
                    hook_ns[0] += time.perf_counter_ns() - t

            setattr(timed, name, wrap)
        timed.counts_tokens = inner.counts_tokens
        modes["on"] = (timed, None, timed)
    answered = count_answers(proxy)
    begin, end = window()
    await gateway.start()
    await Listener(gateway).start("127.0.0.1", GATEWAY_PORT)
    if not os.environ.get("NO_GC_FREEZE"):  # as serve_fleet does (NO_GC_FREEZE=1: the collector without)
        from skyfabric.gateway.serve import settle_heap

        settle_heap()
    await begin.wait()
    profilers = {}
    if profile:
        import cProfile

        profilers = {m: cProfile.Profile() for m in modes}
    rows: list[tuple[str, float, int, float, int]] = []
    mode = "off"
    collector = Collector()
    while not end.is_set():
        mode = "on" if mode == "off" else "off"
        proxy.observer, proxy.sampler, proxy.traced_observer = modes[mode]
        if profilers:
            profilers[mode].enable()
        cpu, n, g, r = time.process_time(), answered[0], collector.seconds, sum(collector.runs)
        await asyncio.sleep(slice_s)
        rows.append(
            (mode, time.process_time() - cpu, answered[0] - n, collector.seconds - g, sum(collector.runs) - r)
        )
        if profilers:
            profilers[mode].disable()
    await asyncio.to_thread(out.write_text, json.dumps(rows))
    if hook_ns[0]:
        on_requests = sum(r[2] for r in rows if r[0] == "on")
        print(f"hooks in place: {hook_ns[0] / on_requests / 1000:.2f} µs/request (wall)", file=sys.stderr)
    if profilers:
        import pstats

        for m, p in profilers.items():
            print(f"==== {m}", file=sys.stderr)
            pstats.Stats(p, stream=sys.stderr).sort_stats("tottime").print_stats(
                os.environ.get("PROFILE_FILTER", ""), 40
            )
    await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=40)
    ap.add_argument("--slice", type=float, default=0.25)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--ratio", type=float, default=0.01)
    ap.add_argument("--no-tracing", action="store_true", help="on = metrics and dashboard only")
    ap.add_argument("--no-metrics", action="store_true", help="on = tracing only")
    ap.add_argument("--no-otlp", action="store_true", help="tracing into the global provider (no export)")
    ap.add_argument("--profile", action="store_true", help="cProfile each mode (stderr of the gateway)")
    ap.add_argument("--aa", action="store_true", help="calibration: 'on' is the no-op observer too (A/A)")
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        import uvloop

        uvloop.install()
        asyncio.run(serve(a.serve, a.out, a.slice, a.profile, a.aa))
        return
    otlp = f"http://127.0.0.1:{SINK_PORT}/v1/traces"
    text = (HERE / "fleet.yaml").read_text().replace("9100", str(MOCK_PORT))
    text = text.replace("9300", str(GATEWAY_PORT))
    enabled = "false" if a.no_tracing else "true"
    endpoint = "" if a.no_otlp else f", otlp_endpoint: '{otlp}'"
    tracing = f"{{enabled: {enabled}, sample_ratio: {a.ratio}{endpoint}}}"
    metrics = "false" if a.no_metrics else "true"
    text += f"observability: {{metrics: {metrics}, dashboard: {metrics}, tracing: {tracing}}}\n"
    mock = start([MOCK_PY, str(SHARED / "mock_upstream.py"), str(MOCK_PORT)], 1, MOCK_PORT)
    sink = start([sys.executable, "-c", SINK, str(SINK_PORT)], 1, SINK_PORT)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config, out = Path(tmp) / "fleet.yaml", Path(tmp) / "slices.json"
            config.write_text(text)
            cmd = [sys.executable, __file__, "--serve", str(config), "--out", str(out)]
            cmd += (
                ["--slice", str(a.slice)] + (["--profile"] if a.profile else []) + (["--aa"] if a.aa else [])
            )
            gw = start(cmd, 0, GATEWAY_PORT, quiet=not (a.profile or os.environ.get("TIME_HOOKS")))
            try:
                wrk(GATEWAY_PORT, 2, a.conns)  # warm: connections, caches, first-request costs
                load = wrk_start(GATEWAY_PORT, a.seconds, a.conns)
                time.sleep(0.5)
                os.kill(gw.pid, signal.SIGUSR1)
                time.sleep(a.seconds - 1.0)
                os.kill(gw.pid, signal.SIGUSR2)
                load.wait()
                deadline = time.monotonic() + 10
                while not out.exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
                rows = json.loads(out.read_text())
            finally:
                stop(gw)
    finally:
        stop(sink)
        stop(mock)
    report(rows, a)


def report(full: list[tuple[str, float, int, float, int]], a: argparse.Namespace) -> None:
    """Paired slices (each on with the off next to it) and the totals of each mode."""
    full = [r for r in full if r[2] > 0]
    rows = [(m, c, n) for m, c, n, _, _ in full]
    per = {m: [cpu / n * 1e6 for mode, cpu, n in rows if mode == m] for m in ("on", "off")}
    ratios = []
    for i in range(len(rows) - 1):
        (m1, c1, n1), (m2, c2, n2) = rows[i], rows[i + 1]
        if m1 != m2:
            on, off = ((c1, n1), (c2, n2)) if m1 == "on" else ((c2, n2), (c1, n1))
            ratios.append((on[0] / on[1]) / (off[0] / off[1]))
    total = {
        m: sum(c for mode, c, _ in rows if mode == m) / sum(n for mode, _, n in rows if mode == m) * 1e6
        for m in ("on", "off")
    }
    what = "metrics+dashboard" if not a.no_metrics else ""
    if not a.no_tracing:
        sink = "global provider" if a.no_otlp else "OTLP to a local sink"
        what += f"{' + ' if what else ''}tracing {a.ratio:.0%} ({sink})"
    if a.aa:
        what = "off as well (A/A calibration: the method's own bias and spread)"
    print(f"on = {what}; {len(rows)} slices of {a.slice}s over {a.seconds}s at {a.conns} connections")
    print(f"requests/slice median {statistics.median(n for _, _, n in rows):.0f}")
    print(f"CPU µs/req: off total {total['off']:.1f} (slice median {statistics.median(per['off']):.1f})")
    print(f"            on  total {total['on']:.1f} (slice median {statistics.median(per['on']):.1f})")
    for m in ("off", "on"):
        n = sum(r[2] for r in full if r[0] == m)
        gc_us = sum(r[3] for r in full if r[0] == m) / n * 1e6
        runs = sum(r[4] for r in full if r[0] == m) / n * 1000
        print(f"garbage collector, {m:3}: {gc_us:.1f} µs/req, {runs:.1f} collections per 1000 requests")
    # Full collections are lumpy (tens of ms, landing in one slice or another): the totals without the
    # collector's time are steadier, though the collections telemetry's allocations cause are real.
    bare = {}
    for m in ("off", "on"):
        n = sum(r[2] for r in full if r[0] == m)
        bare[m] = (sum(r[1] - r[3] for r in full if r[0] == m)) / n * 1e6
    change = bare["on"] / bare["off"] - 1
    print(f"without the collector: off {bare['off']:.1f}, on {bare['on']:.1f} µs/req, {change:+.1%}")
    q = statistics.quantiles(ratios, n=4)
    print(
        f"overhead: totals {total['on'] / total['off'] - 1:+.1%}; median of {len(ratios)} adjacent pairs "
        f"{statistics.median(ratios) - 1:+.1%} (quartiles {q[0] - 1:+.1%} … {q[2] - 1:+.1%})"
    )


if __name__ == "__main__":
    main()
