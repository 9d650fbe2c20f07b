"""CPU cost of the usage ledger per request: the hot path (event-loop thread) and the whole process.

Drives the router's hook sequence for a non-streamed and for a streamed request, as ``observer_cost.py``
does, with the no-op observer and with the ledger's observer writing to a real outbox (fsync every 5 ms)
shipped to SQLite by its shipper process. ``thread`` is the calling thread's CPU (what a request waits
for); ``shipper`` is the shipper process's (fsync, reading, parsing, SQLite), amortized over the records.

    PYTHONPATH=src .venv/bin/python bench/ledger_cost.py
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from skyfabric.core.endpoints import fleet_endpoints
from skyfabric.core.fleet import LedgerConfig, load_fleet
from skyfabric.gateway.context import RequestContext
from skyfabric.gateway.ledger_observer import LedgerObserver
from skyfabric.gateway.observe import Observer
from skyfabric.gateway.proxy import Proxy
from skyfabric.ops.database import Database
from skyfabric.ops.ledger import Ledger
from skyfabric.ops.pricing import PriceBook
from skyfabric.protocols.canonical import Usage
from skyfabric.protocols.frontends.openai import OpenAIFrontend

fleet = load_fleet(Path(__file__).resolve().parent / "fleet.yaml")
proxy = Proxy(fleet, fleet_endpoints(fleet))
state = next(iter(proxy.states.values()))
body = (
    b'{"id":"chatcmpl-mock","object":"chat.completion","created":1,"model":"tiny","choices":[{"index":0,'
    b'"finish_reason":"stop","message":{"role":"assistant","content":"' + b"hello " * 16 + b'"}}],'
    b'"usage":{"prompt_tokens":10,"completion_tokens":16,"total_tokens":26}}'
)
usage = [Usage(10, 16)]
frontend = OpenAIFrontend()
raw = b'{"model":"tiny","messages":[{"role":"user","content":"hi"}]}'


def shipper_cpu() -> float:
    """The shipper process's CPU seconds so far (0 before it started)."""
    process = ledger._process if ledger is not None else None
    if process is None:
        return 0.0
    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


ledger: Ledger | None = None


def run(obs: Observer, n: int, stream: bool) -> tuple[float, float]:
    t, p = time.thread_time(), shipper_cpu()
    for _ in range(n):
        parsed = frontend.parse(b"/v1/chat/completions", raw, [])
        ctx = RequestContext("chat", parsed.body, raw, "tiny", stream, 0.0, parsed, frontend)
        obs.request_start(ctx)
        obs.attempt_start(ctx, state, "attempt")
        obs.upstream_headers(ctx, state)
        obs.attempt_end(ctx, state, "ok", 0.01, None if stream else body)
        obs.request_end(ctx, 200, 0.01)
        if stream:
            ctx.usage_parts = usage
            obs.stream_end(ctx, state, 16, True)
    time.sleep(0.2)  # the shipper's work for these records happens now
    return (time.thread_time() - t) / n * 1e6, (shipper_cpu() - p) / n * 1e6


with tempfile.TemporaryDirectory() as tmp:
    database = Database.at(os.path.join(tmp, "l.sqlite"))
    ledger = Ledger(LedgerConfig(enabled=True), database, Path(tmp) / "outbox")
    ledger.start()
    on = LedgerObserver(ledger, PriceBook(fleet), proxy.clock)
    variants = {"off (no-op observer)": Observer(), "ledger (outbox + SQLite)": on}
    for stream in (False, True):
        res: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        for _ in range(5):
            for k, v in variants.items():
                res[k].append(run(v, 5000, stream))
        base = min(t for t, _ in res["off (no-op observer)"])
        print("streamed" if stream else "non-streamed")
        for k, v in res.items():
            threads = [t for t, _ in v]
            procs = [p for _, p in v]
            print(
                f"  {k:26} thread min {min(threads):6.2f} µs median {statistics.median(threads):6.2f} µs"
                f" (added {min(threads) - base:6.2f})  shipper median {statistics.median(procs):6.2f} µs"
            )
    ledger.close()
    print(f"records shipped: {ledger.shipped}, appended: {ledger.outbox.appended}")
    fd = os.open(os.path.join(tmp, "probe"), os.O_WRONLY | os.O_CREAT)
    times = []
    for _ in range(50):
        os.write(fd, b"x" * 400)
        t = time.perf_counter()
        os.fsync(fd)
        times.append((time.perf_counter() - t) * 1e6)
    os.close(fd)
    print(f"fsync of one 400-byte append on this disk: median {statistics.median(times):.0f} µs")
