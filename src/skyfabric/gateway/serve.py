"""Runs the gateway: one process per worker on a shared port (SO_REUSEPORT), uvloop, clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from skyfabric.core.endpoints import fleet_endpoints
from skyfabric.core.fleet import Fleet
from skyfabric.core.lifetime import die_with_parent
from skyfabric.gateway.app import Gateway
from skyfabric.http.server import Listener

log = logging.getLogger("skyfabric.gateway")


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; Windows lacks it
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve_fleet(
    fleet: Fleet, host: str, port: int, *, reuse_port: bool = False, fleet_path: str | None = None
) -> None:
    """Serve until SIGINT/SIGTERM; finishes responses in flight before returning.

    With ``fleet_path``, changes to the pools' endpoint lists in that file are applied while serving.
    """
    gateway = Gateway(fleet, fleet_endpoints(fleet), fleet_path=fleet_path)
    await gateway.start()
    listener = Listener(gateway, max_body_bytes=fleet.listener.max_body_bytes)
    bound = await listener.start(host, port, reuse_port=reuse_port)
    log.info("gateway listening on http://%s:%d (pid %d)", host, bound, os.getpid())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await listener.stop(grace=5.0)
    await gateway.close()


def run(fleet: Fleet, host: str, port: int, workers: int = 1, fleet_path: str | None = None) -> None:
    """Run ``workers`` gateway processes sharing ``host:port``; the parent supervises them."""
    if workers <= 1:
        _install_uvloop()
        asyncio.run(serve_fleet(fleet, host, port, fleet_path=fleet_path))
        return
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # child
            die_with_parent()
            try:
                _install_uvloop()
                asyncio.run(serve_fleet(fleet, host, port, reuse_port=True, fleet_path=fleet_path))
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
    sys.exit(status)
