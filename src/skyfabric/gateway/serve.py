"""Runs the gateway: one process per worker on a shared port (SO_REUSEPORT), uvloop, clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile

from skyfabric.core.endpoints import fleet_endpoints
from skyfabric.core.fleet import Fleet
from skyfabric.core.fleet import Listener as ListenerSettings
from skyfabric.core.lifetime import die_with_parent
from skyfabric.gateway.api_errors import error_body
from skyfabric.gateway.app import Gateway
from skyfabric.gateway.instance import WorkerPeers
from skyfabric.http.server import Listener

log = logging.getLogger("skyfabric.gateway")


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; Windows lacks it
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def make_listener(gateway: Gateway, settings: ListenerSettings) -> Listener:
    """The listener for the gateway, with every limit of the fleet file's ``listener`` section."""
    _allow_open_files(settings.max_connections)
    return Listener(
        gateway,
        error_body=error_body,
        max_body_bytes=settings.max_body_bytes,
        max_request_line_bytes=settings.max_request_line_bytes,
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        write_timeout=settings.write_timeout,
        keepalive_timeout=settings.keepalive_timeout,
        max_connections=settings.max_connections,
    )


def _allow_open_files(max_connections: int) -> None:
    """Raise the soft open-file limit so that ``max_connections`` clients (and as many upstream
    connections) fit; past the limit accept() fails with EMFILE instead of the cap refusing cleanly."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    want = 2 * max_connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < want:
            log.warning(
                "open-file limit %d is low for listener.max_connections %d (raise `ulimit -n`)",
                target,
                max_connections,
            )


#: Net container allocations between two collections of the youngest generation (CPython's default: 700).
GC_YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """Collect start-up's garbage, then move every object left into the collector's permanent generation.

    A serving gateway holds a large, long-lived heap built at start (modules, the fleet, clients, the
    OpenTelemetry and Prometheus machinery) and allocates short-lived containers per request. Each
    collection of the oldest generation walked all of start-up's objects again: 9–16 µs of every
    request's CPU on the development machine, 10–15 %, whether telemetry was on or off. Frozen
    (``gc.freeze``), they are never scanned; measured with ``bench/observability_ab.py`` the collector's
    share fell from 13.1 to 4.6 µs per request. Objects made later (new series, connections) are
    collected as before, and nothing frozen is ever freed, which is what start-up's objects are for.

    The youngest generation is collected after :data:`GC_YOUNG_THRESHOLD` net allocations, not 700: a
    request's objects are freed by reference counting when it ends, but 32 requests in flight hold ~1,000
    containers at any moment, so at 700 a collection ran every ~30 requests and walked them all, live
    ones (2.3–2.8 µs of every request's CPU; 4.1–4.5 µs with keys, limits and the ledger on, which keep
    more per request). At 10,000 it ran no more in a 20 s run at saturation (``GC_STATS=1
    bench/operations_ab.py``); garbage cycles, which only the collector frees, wait for 10,000 net
    allocations at most (a few MB).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)


async def serve_fleet(
    fleet: Fleet,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    worker: int = 0,
    workers: int = 1,
    fleet_path: str | None = None,
    run_dir: str | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM; finishes responses in flight before returning.

    As worker ``worker`` of ``workers`` this process admits its share of each model's capacity: workers
    do not see each other's requests, and each admitting the whole would admit N times what the fleet
    carries. Dividing (rather than sharing a counter across processes) keeps admission two integer
    operations with no cross-process lock on the hot path, and nothing leaks when a worker dies; the
    kernel spreads connections over the workers (SO_REUSEPORT), so the shares fill about evenly.

    With ``fleet_path``, changes to the pools' endpoint lists in that file are applied while serving.
    With ``run_dir`` (the supervisor's, shared by the workers), ``/metrics`` and the dashboard show the
    whole instance: the answering worker merges its peers' figures (``gateway/instance.py``).
    """
    gateway = Gateway(fleet, fleet_endpoints(fleet), fleet_path=fleet_path)
    gateway.proxy.admission.set_share(worker, workers)
    peers = None
    if run_dir is not None and workers > 1:
        peers = WorkerPeers(run_dir, worker, workers)
        gateway.join_workers(peers)
        await peers.start()
    await gateway.start()
    listener = make_listener(gateway, fleet.listener)
    tls = fleet.listener.ssl_context()
    bound = await listener.start(host, port, reuse_port=reuse_port, ssl=tls)
    scheme = "https" if tls is not None else "http"
    log.info("gateway listening on %s://%s:%d (pid %d)", scheme, host, bound, os.getpid())
    settle_heap()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await listener.stop(grace=5.0)
    await gateway.close()
    if peers is not None:
        await peers.close()


def run(fleet: Fleet, host: str, port: int, workers: int = 1, fleet_path: str | None = None) -> None:
    """Run ``workers`` gateway processes sharing ``host:port``; the parent supervises them."""
    if workers <= 1:
        _install_uvloop()
        asyncio.run(serve_fleet(fleet, host, port, fleet_path=fleet_path))
        return
    children: list[int] = []
    # The workers' meeting place: each answers its peers on a Unix socket here (fleet-wide /metrics).
    run_dir = tempfile.mkdtemp(prefix="skyfabric-workers-")
    for worker in range(workers):
        pid = os.fork()
        if pid == 0:  # child
            die_with_parent()
            try:
                _install_uvloop()
                serve = serve_fleet(
                    fleet,
                    host,
                    port,
                    reuse_port=True,
                    worker=worker,
                    workers=workers,
                    fleet_path=fleet_path,
                    run_dir=run_dir,
                )
                asyncio.run(serve)
            finally:
                os._exit(0)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for child in children:
        while True:
            try:
                _, code = os.waitpid(child, 0)
                status = status or os.waitstatus_to_exitcode(code)
                break
            except InterruptedError:
                continue
    shutil.rmtree(run_dir, ignore_errors=True)
    sys.exit(status)
