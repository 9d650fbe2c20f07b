"""Operations on vs off in ONE gateway process, alternated every few hundred milliseconds under steady load.

Why: separately started gateways drift by ±20 % in CPU per request from run to run on a shared machine
(``keys_limits.py`` shows it), more than the difference to be measured. Here one gateway, configured with
everything on (``keys_limits.py``'s "all" fleet: a managed key with all four limits, enforced through
Redis, and the usage ledger), switches every ``--slice`` seconds between its real request path ("on":
the keys filter and the observers that settle limits and write the ledger) and the same path without them
("off"), while one long wrk run keeps it busy. Each slice records the gateway's CPU time and the requests
answered. The ledger's shipper is a child process on the same core: its CPU over the whole run is charged
to the "on" requests (an "off" slice writes no record; the shipper's idle ticks are part of having it on).

"off" still authenticates the key against the managed key cache and keeps Redis connections (heartbeats,
shared fleet state) alive: a few µs closer to "on" than a gateway without ``operations`` at all.

    .venv/bin/python bench/operations_ab.py [--seconds 40] [--slice 0.5] [--mode all|keys|ledger|none]

``--mode`` names what "off" drops (``none``: an A/A calibration). ``TIME_HOOKS=1`` prints each operations
hook's wall time in place (``TIME_HOOKS=cpu``: the thread's CPU time, less the cost of reading it; an
awaiting hook's figure then counts whatever ran meanwhile; ``HOOKS_ONLY=1``: no nested timers in the
limiter, whose own reads inflate the hooks that call it); ``RUSAGE=1`` each mode's user and system CPU,
minor faults and context switches per request; ``GC_STATS=1`` the collector's share of each
mode; ``PROFILE=<dir>`` writes a cProfile of each mode there (µs per request); ``PAUSE_SHIPPER=1`` stops the
shipper (SIGSTOP) for the measured run: what its work on the same core costs the gateway's own code (the
outbox keeps the records; it ships them when continued).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ab import Collector, count_answers, window
from keys_limits import fleets, wait_limits_ok
from layers import cpu_seconds, descendants
from procs import HERE, start, start_mock, stop, wrk, wrk_start

GATEWAY_PORT = 9302


async def serve(config: Path, out: Path, slice_s: float, mode: str) -> None:
    """The gateway; on SIGUSR1 it alternates operations on and off until SIGUSR2."""
    from skyfabric.core.endpoints import fleet_endpoints
    from skyfabric.core.fleet import load_fleet
    from skyfabric.gateway.app import Gateway
    from skyfabric.gateway.observe import Observer, combine
    from skyfabric.gateway.serve import settle_heap
    from skyfabric.gateway.usage_observer import KeysAndLedger
    from skyfabric.http.server import Listener

    fleet = load_fleet(config)
    gateway = Gateway(fleet, fleet_endpoints(fleet), fleet_path=config)
    proxy = gateway.proxy
    ops = gateway.operations
    dropped = set()
    if mode in ("all", "keys"):
        dropped.add(ops.keys_filter)
    if mode in ("all", "ledger"):
        dropped.add(ops.ledger)
    assert proxy.sampler is None, "the bench fleet traces nothing"
    on_observer = proxy.observer
    # The keys' settlement and the ledger run as one observer when both are on (``usage_observer.py``):
    # "off" keeps whichever of the two the mode does not drop, as the gateway would install it alone.
    parts = []
    for o in on_observer.observers:  # type: ignore[attr-defined]
        parts.extend([o.keys, o.ledger] if isinstance(o, KeysAndLedger) else [o])
    kept = [o for o in parts if o not in dropped]
    # Each request keeps what it started with (a switch mid-request would settle a lease never taken or
    # end a ledger record that never began): the first filter marks the request, as tracing's sampling
    # would, and the router picks the observers by that mark.
    state = ["off"]
    keys_filter = ops.keys_filter if ops.keys_filter in dropped else None
    kept_filters = [f for f in gateway.filters if f is not keys_filter]

    def mark(request, ctx):  # type: ignore[no-untyped-def]
        ctx.traced = state[0] == "on"
        if ctx.traced and keys_filter is not None:
            return keys_filter(request, ctx)  # None, or an awaitable the pipeline awaits
        return None

    class Marked:
        def sampled(self, ctx) -> bool:  # type: ignore[no-untyped-def]
            return ctx.traced

    proxy.observer, proxy.traced_observer, proxy.sampler = combine(kept), on_observer, Marked()  # type: ignore[assignment]
    gateway.filters[:] = [mark, *kept_filters]
    timing: dict[str, list[int]] = {}
    # TIME_HOOKS=1: wall time; TIME_HOOKS=cpu: the thread's CPU time (a system call each read: less the
    # cost of two reads, measured at start)
    clock_ns = time.thread_time_ns if os.environ.get("TIME_HOOKS") == "cpu" else time.perf_counter_ns
    empty = min(-clock_ns() + clock_ns() for _ in range(1000))
    if os.environ.get("TIME_HOOKS"):  # ns and calls of each operations hook, in place

        def timed(obj, name, key):  # type: ignore[no-untyped-def]
            f = getattr(obj, name)
            acc = timing.setdefault(key, [0, 0])
            if asyncio.iscoroutinefunction(f):

                async def awrap(*args, _f=f, _acc=acc, **kw):  # type: ignore[no-untyped-def]
                    t = clock_ns()
                    try:
                        return await _f(*args, **kw)
                    finally:
                        _acc[0] += clock_ns() - t - empty
                        _acc[1] += 1

                setattr(obj, name, awrap)
            else:

                def wrap(*args, _f=f, _acc=acc, **kw):  # type: ignore[no-untyped-def]
                    t = clock_ns()
                    try:
                        return _f(*args, **kw)
                    finally:
                        _acc[0] += clock_ns() - t - empty
                        _acc[1] += 1

                setattr(obj, name, wrap)

        limiter = ops.limiter
        if limiter is not None and not os.environ.get("HOOKS_ONLY"):
            for name in ("granted", "admit_asked", "settle", "_take"):
                timed(limiter, name, f"limiter.{name}")
        for obs in on_observer.observers:  # type: ignore[attr-defined]
            for name in ("request_start", "attempt_start", "attempt_end", "request_end", "stream_end"):
                if getattr(type(obs), name) is not getattr(Observer, name):
                    timed(obs, name, f"{type(obs).__name__}.{name}")
        proxy.observer, proxy.traced_observer = combine(kept), combine(list(on_observer.observers))  # type: ignore[attr-defined]
        if keys_filter is not None:
            kf = keys_filter
            acc = timing.setdefault("KeysFilter.__call__", [0, 0])

            def keys_timed(request, ctx, _kf=kf, _acc=acc):  # type: ignore[no-untyped-def]
                t = clock_ns()  # the filter's own step; a round trip it returns to await is not timed
                try:
                    return _kf(request, ctx)
                finally:
                    _acc[0] += clock_ns() - t - empty
                    _acc[1] += 1

            keys_filter = keys_timed  # type: ignore[assignment]
    answered = count_answers(proxy)
    begin, end = window()
    await gateway.start()
    await Listener(gateway).start("127.0.0.1", GATEWAY_PORT)
    settle_heap()
    await begin.wait()
    rows: list[tuple[str, float, int]] = []
    current = "off"
    gc_time = {"on": 0.0, "off": 0.0}
    gc_runs = {"on": [0, 0, 0], "off": [0, 0, 0]}
    collector = Collector()
    usage: dict[str, list[float]] = {}
    profilers: dict[str, Any] = {}
    if os.environ.get("PROFILE"):
        import cProfile

        profilers = {m: cProfile.Profile() for m in ("on", "off")}
    while not end.is_set():
        current = "on" if current == "off" else "off"
        state[0] = current
        if profilers:
            profilers[current].enable()
        cpu, n, g, runs = time.process_time(), answered[0], collector.seconds, list(collector.runs)
        use = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.sleep(slice_s)
        after = resource.getrusage(resource.RUSAGE_SELF)
        acc = usage.setdefault(current, [0.0] * 6)
        for i, f in enumerate(("ru_utime", "ru_stime", "ru_minflt", "ru_majflt", "ru_nvcsw", "ru_nivcsw")):
            acc[i] += getattr(after, f) - getattr(use, f)
        rows.append((current, time.process_time() - cpu, answered[0] - n))
        gc_time[current] += collector.seconds - g
        gc_runs[current] = [
            t + now - then for t, now, then in zip(gc_runs[current], collector.runs, runs, strict=True)
        ]
        if profilers:
            profilers[current].disable()
    if profilers:
        import pstats

        for m, prof in profilers.items():
            count = sum(k for mode, _, k in rows if mode == m)
            stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
            lines = [
                f"{tt / count * 1e6:9.3f} {ct / count * 1e6:9.3f} {nc / count:8.3f} {file}:{line}:{name}\n"
                for (file, line, name), (_, nc, tt, ct, _) in sorted(stats.items(), key=lambda i: -i[1][2])
            ]
            # Per request: µs in the function itself, µs with what it called, calls.
            (Path(os.environ["PROFILE"]) / f"cprof-{m}.txt").write_text("".join(lines))
    collector.close()
    for m in ("on", "off"):
        count = sum(k for mode, _, k in rows if mode == m)
        runs = [round(r * 1000 / count, 2) for r in gc_runs[m]]
        print(
            f"garbage collector, {m}: {gc_time[m] / count * 1e6:.1f} µs/request;"
            f" collections (gen 0, 1, 2) per 1000 requests {runs}",
            file=sys.stderr,
        )
    for m in ("on", "off"):
        count = sum(k for mode, _, k in rows if mode == m)
        u = usage.get(m, [0.0] * 6)
        print(
            f"rusage, {m}: user {u[0] / count * 1e6:.1f} µs/request, system {u[1] / count * 1e6:.1f};"
            f" per 1000 requests: minor faults {u[2] * 1000 / count:.1f}, voluntary switches"
            f" {u[4] * 1000 / count:.1f}, involuntary {u[5] * 1000 / count:.1f}",
            file=sys.stderr,
        )
    await asyncio.to_thread(out.write_text, json.dumps(rows))
    on_n = sum(n for m, _, n in rows if m == "on")
    if os.environ.get("TIME_HOOKS") and ops.limiter is not None:
        lim = ops.limiter
        print(
            "grants:",
            {
                k: (
                    g.requests,
                    g.tokens,
                    g.budget,
                    len(g.slots),
                    g.expires - lim.clock(),
                    g.near_until - lim.clock(),
                    g.fetching,
                    g.live,
                )
                for k, g in lim.grants.items()
            },
            "asked",
            lim._grants_asked,
            "running",
            len(lim._running),
            file=sys.stderr,
        )
    for key, (ns, calls) in sorted(timing.items()):
        print(
            f"{key:40s} {calls / on_n:6.3f} calls/req {ns / max(calls, 1) / 1000:7.2f} µs/call"
            f" {ns / on_n / 1000:7.2f} µs/req",
            file=sys.stderr,
        )
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    await gateway.close()  # grants given back, the ledger shipped: the next run starts clean


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=40)
    ap.add_argument("--slice", type=float, default=0.5)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument(
        "--mode", default="all", choices=["all", "keys", "ledger", "none"], help="what 'off' drops"
    )
    ap.add_argument("--ledger", default="", help="JSON merged into operations.ledger (try settings)")
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        import uvloop

        uvloop.install()
        asyncio.run(serve(a.serve, a.out, a.slice, a.mode))
        return
    import yaml

    mock = start_mock()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = fleets(Path(tmp))["all"]
            if a.ledger:
                data = yaml.safe_load(config.read_text())
                data["operations"]["ledger"].update(json.loads(a.ledger))
                config.write_text(yaml.safe_dump(data))
            out = Path(tmp) / "slices.json"
            cmd = [sys.executable, __file__, "--serve", str(config), "--out", str(out)]
            cmd += ["--slice", str(a.slice), "--mode", a.mode]
            gw = start(
                cmd,
                0,
                GATEWAY_PORT,
                {"PYTHONPATH": str(HERE.parent / "src")},
                quiet=not (
                    os.environ.get("TIME_HOOKS") or os.environ.get("GC_STATS") or os.environ.get("RUSAGE")
                ),
            )
            try:
                wait_limits_ok()
                wrk(GATEWAY_PORT, 2, a.conns)  # warm: connections, caches, first-request costs
                children = descendants(gw.pid)
                paused = bool(os.environ.get("PAUSE_SHIPPER"))
                for pid in children if paused else ():
                    os.kill(pid, signal.SIGSTOP)
                load = wrk_start(GATEWAY_PORT, a.seconds, a.conns)
                time.sleep(0.5)
                kids = sum(cpu_seconds(p) for p in children)
                os.kill(gw.pid, signal.SIGUSR1)
                time.sleep(a.seconds - 1.0)
                os.kill(gw.pid, signal.SIGUSR2)
                kids = sum(cpu_seconds(p) for p in children) - kids
                load.wait()
                for pid in children if paused else ():
                    os.kill(pid, signal.SIGCONT)
                deadline = time.monotonic() + 10
                while not out.exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
                rows = json.loads(out.read_text())
            finally:
                stop(gw)
    finally:
        stop(mock)
    report(rows, kids, a)


def report(rows: list[tuple[str, float, int]], kids: float, a: argparse.Namespace) -> None:
    rows = [r for r in rows if r[2] > 0]
    ratios = []
    for (m1, c1, n1), (m2, c2, n2) in itertools.pairwise(rows):
        if m1 != m2:
            on, off = ((c1, n1), (c2, n2)) if m1 == "on" else ((c2, n2), (c1, n1))
            ratios.append((off[0] / off[1]) / (on[0] / on[1]))
    cpu = {m: sum(c for mode, c, _ in rows if mode == m) for m in ("on", "off")}
    n = {m: sum(k for mode, _, k in rows if mode == m) for m in ("on", "off")}
    off_us = cpu["off"] / n["off"] * 1e6
    on_us = cpu["on"] / n["on"] * 1e6
    kid_us = kids / n["on"] * 1e6
    print(f"'off' drops: {a.mode}; {len(rows)} slices of {a.slice}s, {a.conns} connections")
    total = on_us + kid_us
    print(f"CPU µs/request: off {off_us:.1f}; on {on_us:.1f} gateway + {kid_us:.1f} shipper = {total:.1f}")
    print(
        f"off/on (the req/s ratio a CPU-bound core would give): gateway {off_us / on_us:.1%},"
        f" with shipper {off_us / (on_us + kid_us):.1%}; median of {len(ratios)} pairs (gateway)"
        f" {statistics.median(ratios):.1%}"
    )


if __name__ == "__main__":
    main()
